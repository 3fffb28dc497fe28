"""The initial train state of every entry (vmapped, compiled once) and the empty histories a fit fills."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import sharding as sharding_lib
from localmoe.train import evaluation, optimizer, step
from localmoe.train.settings import Settings
from localmoe.train.state import FitState
from localmoe.train.task import Data, Task


def seed_keys(seeds: Sequence[int]) -> jax.Array:
  """One PRNG key per entry; init uses fold_in(key, 0), shuffling fold_in(key, 1), a task's rngs
  fold_in(key, 2)."""
  return jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])


def entry_state(params, opt_state) -> dict:
  """The train state of one entry that `train_step` takes: alive, not diverged."""
  return {
    "params": params,
    "opt_state": opt_state,
    "alive": jnp.asarray(True),
    "diverged_step": jnp.asarray(-1, jnp.int32),
  }


def _init_program(task: Task, data: Data, seeds: Sequence[int], learning_rate, weight_decay, settings: Settings):
  """(the vmapped initialisation of every entry, its arguments)."""
  entries = len(seeds)
  lr = jnp.broadcast_to(jnp.asarray(learning_rate, jnp.float32), (entries,))
  wd = jnp.broadcast_to(jnp.asarray(weight_decay, jnp.float32), (entries,))
  tx = optimizer.make_optimizer(settings, step.total_steps(settings, data.num_train))

  def one_entry(key, lr, wd, frozen):
    params = task.init(jax.random.fold_in(key, 0), frozen)
    opt_state = tx.init(params)
    optimizer.set_hyperparams(opt_state, settings, lr, wd)
    return entry_state(params, opt_state)

  frozen_axis = 0 if data.per_seed else None
  return jax.vmap(one_entry, in_axes=(0, 0, 0, frozen_axis)), (seed_keys(seeds), lr, wd, data.frozen)


def init_state(
  task: Task,
  data: Data,
  seeds: Sequence[int],
  learning_rate,
  weight_decay,
  settings: Settings,
  placement: sharding_lib.Placement | None = None,
) -> Any:
  """Vmapped initial train state for every entry (placed by `placement`, e.g. entry axis over devices)."""
  fn, args = _init_program(task, data, seeds, learning_rate, weight_decay, settings)
  out = {} if placement is None else {"out_shardings": placement.entry_sharding()}
  lowered = jax.jit(fn, **out).lower(*args)
  return lowered.compile(compiler_options=_run_once_compiler_options())(*args)


def _run_once_compiler_options() -> dict:
  """XLA options for a program that runs once (the initial state): on CPU, backend optimisation level 0
  compiles the random initialisers about 5x faster (1.5 s -> 0.3 s for a routed grid); the values can
  differ from the optimised build's by an ulp (e.g. 1.2e-7 in 4% of a router kernel's entries)."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def entry_hyperparams(settings: Settings, entries: int, learning_rate=None, weight_decay=None):
  """Per-entry learning rate and weight decay, float32 [entries] each (None: the settings' values)."""
  lr = settings.learning_rate if learning_rate is None else learning_rate
  wd = settings.weight_decay if weight_decay is None else weight_decay
  return (
    np.broadcast_to(np.asarray(lr, np.float32), (entries,)),
    np.broadcast_to(np.asarray(wd, np.float32), (entries,)),
  )


def empty_history(task: Task, data: Data, entries: int, settings: Settings) -> np.ndarray:
  """NaN history [entries, epochs, splits, metrics], filled epoch by epoch."""
  return np.full((entries, settings.epochs, len(data.splits), len(task.metric_names)), np.nan)


def empty_train_history(task: Task, entries: int, settings: Settings) -> np.ndarray:
  """NaN [entries, epochs, len(task.train_names)]: epoch means of the objective and the aux outputs."""
  return np.full((entries, settings.epochs, len(task.train_names)), np.nan, np.float32)


def empty_diagnostics(task: Task, data: Data, entries: int, settings: Settings) -> dict[str, np.ndarray]:
  """NaN {name: [entries, epochs, ...]} shaped like Task.diagnostics (a shape-only evaluation)."""
  if task.diagnostics is None:
    return {}
  take = (lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)) if data.per_seed else (lambda tree: tree)
  frozen, test = take(data.frozen), take(dict(data.test))
  params = jax.eval_shape(lambda k, f: task.init(k, f), jax.random.PRNGKey(0), frozen)
  shapes = jax.eval_shape(
    lambda p, f, t: evaluation.diagnostics(task, p, f, t, settings.eval_batch_size), params, frozen, test
  )
  return {name: np.full((entries, settings.epochs, *leaf.shape), np.nan, np.float32) for name, leaf in shapes.items()}


def fit_state_template(
  task: Task, data: Data, seeds: Sequence[int], settings: Settings, learning_rate=None, weight_decay=None
) -> FitState:
  """The shapes of the FitState of epoch 0, on the default device, computing nothing: what a checkpoint is
  restored into (a resume compiles no initialisation)."""
  lr, wd = entry_hyperparams(settings, len(seeds), learning_rate, weight_decay)
  fn, args = _init_program(task, data, seeds, lr, wd, settings)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = jax.tree_util.tree_map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), jax.eval_shape(fn, *args)
  )
  return FitState(
    state,
    0,
    empty_history(task, data, len(seeds), settings),
    empty_train_history(task, len(seeds), settings),
    empty_diagnostics(task, data, len(seeds), settings),
    np.full((len(seeds),), np.nan, np.float32),
  )
