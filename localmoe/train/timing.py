"""Wall time of the trainer's own step, for the step-time columns of result tables."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from localmoe.train.initial import entry_state
from localmoe.train.optimizer import make_optimizer
from localmoe.train.step import train_step
from localmoe.train.task import Task


def step_seconds(task: Task, params, frozen, batch: dict, repeats: int, step_fn=train_step) -> float:
  """Median seconds of one compiled, vmapped step (all entries of `params`, leading entry axis) on `batch`
  (a dict with "y"), after one untimed call that compiles it. step_fn: the step `fit` was given (default
  `train_step`); a task with rng streams (`Task.rngs`) gets a fixed key."""
  if not callable(step_fn):
    raise TypeError(f"step_fn={step_fn!r} is not callable: pass the step given to fit, or leave the default.")
  tx = make_optimizer()
  state = jax.vmap(lambda p: entry_state(p, tx.init(p)))(params)
  inputs = {k: jnp.asarray(v) for k, v in batch.items() if k != "y"}
  y, mask = jnp.asarray(batch["y"]), jnp.ones(batch["y"].shape[0])
  extra = (jax.random.PRNGKey(0),) if task.rngs else ()
  step = jax.jit(jax.vmap(functools.partial(step_fn, task, tx), in_axes=(0,) + (None,) * (5 + len(extra))))
  jax.block_until_ready(step(state, frozen, inputs, y, mask, jnp.asarray(0), *extra))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(state, frozen, inputs, y, mask, jnp.asarray(0), *extra))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
