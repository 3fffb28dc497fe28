"""Evaluation of a whole split in chunks of `Settings.eval_batch_size` rows (bounded memory), and the
task's optional diagnostics."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from localmoe import metrics
from localmoe.train.task import Batch, Task


def split_inputs(batch: Batch) -> tuple[Batch, jax.Array]:
  """(every key but "y", y)."""
  inputs = {k: v for k, v in batch.items() if k != "y"}
  return inputs, batch["y"]


def _chunk_sums(values, predict, params, frozen, inputs: Batch, y: jax.Array, chunk: int) -> jax.Array:
  """Sum over all rows of values(pred, y) [chunk, k] -> [k], predicting `chunk` rows at a time (lax.map; the
  last chunk is padded with repeated rows that are masked out)."""
  n = y.shape[0]
  steps = math.ceil(n / chunk)
  idx = jnp.minimum(jnp.arange(steps * chunk), n - 1).reshape(steps, chunk)
  valid = (jnp.arange(steps * chunk) < n).reshape(steps, chunk)

  def sums_of_chunk(args):
    rows, keep = args
    out = values(predict(params, frozen, jax.tree_util.tree_map(lambda a: a[rows], inputs)), y[rows])  # [chunk, k]
    return jnp.sum(jnp.where(keep[:, None], out, 0.0), axis=0)  # [k]

  return jax.lax.map(sums_of_chunk, (idx, valid)).sum(0)


def chunked_metrics(predict, params, frozen, split: Batch, chunk: int) -> jax.Array:
  """[mse, r2] (regression) on a whole split, predicting in chunks of `chunk` rows."""
  inputs, y = split_inputs(jax.tree_util.tree_map(jnp.asarray, dict(split)))
  if y.shape[0] <= chunk:
    pred = predict(params, frozen, inputs)
    return jnp.stack([metrics.mse(pred, y), metrics.r2(pred, y)])
  squared_error = lambda pred, rows: ((pred - rows) ** 2).reshape(rows.shape[0], -1).sum(-1)[:, None]
  sse = _chunk_sums(squared_error, predict, params, frozen, inputs, y, chunk)[0]
  return jnp.stack([sse / y.size, 1.0 - sse / metrics.sum_squares_total(y)])


def chunked_means(per_example, predict, params, frozen, split: Batch, chunk: int) -> jax.Array:
  """Mean over a whole split of per-example metrics [batch, k] -> [k], predicting in chunks of `chunk` rows."""
  inputs, y = split_inputs(jax.tree_util.tree_map(jnp.asarray, dict(split)))
  n = y.shape[0]
  if n <= chunk:
    return jnp.mean(per_example(predict(params, frozen, inputs), y), axis=0)
  return _chunk_sums(per_example, predict, params, frozen, inputs, y, chunk) / n


def evaluate(task: Task, params, frozen, split: Batch, chunk: int, step=None) -> jax.Array:
  """The task's metrics on one split: [len(task.metric_names)]. Deterministic: no rngs; `step` (the global
  steps taken) reaches `predict` only when the task declares `takes_step`."""
  predict = lambda p, f, inputs: task.predictions(p, f, inputs, step)
  if task.per_example_metrics is None:
    return chunked_metrics(predict, params, frozen, split, chunk)
  return chunked_means(task.per_example_metrics, predict, params, frozen, split, chunk)


def diagnostics(task: Task, params, frozen, split: Batch, chunk: int) -> dict[str, jax.Array]:
  """Task.diagnostics on the first `chunk` examples of a split ({} without diagnostics)."""
  if task.diagnostics is None:
    return {}
  inputs, _ = split_inputs(jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:chunk], dict(split)))
  return dict(task.diagnostics(params, frozen, inputs))
