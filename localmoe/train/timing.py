"""Wall time of the trainer's own step, for the step-time columns of result tables."""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from localmoe.train.initial import entry_state
from localmoe.train.optimizer import make_optimizer
from localmoe.train.task import Task


def step_seconds(task: Task, params, frozen, batch: dict, repeats: int) -> float:
  """Median seconds of one compiled, vmapped `train_step` (all entries of `params`, leading entry axis) on
  `batch` (a dict with "y"), after one untimed call that compiles it."""
  tx = make_optimizer()
  state = jax.vmap(lambda p: entry_state(p, tx.init(p)))(params)
  inputs = {k: jnp.asarray(v) for k, v in batch.items() if k != "y"}
  y, mask = jnp.asarray(batch["y"]), jnp.ones(batch["y"].shape[0])
  train_step = sys.modules["localmoe.train"].train_step          # the (possibly forked) step of every fit
  step = jax.jit(jax.vmap(functools.partial(train_step, task, tx), in_axes=(0, None, None, None, None, None)))
  jax.block_until_ready(step(state, frozen, inputs, y, mask, jnp.asarray(0)))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(state, frozen, inputs, y, mask, jnp.asarray(0)))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
