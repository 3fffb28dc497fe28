"""The fit loop: every experiment trains its methods through `fit`.

The Python loop between compiled calls (`step.build_epoch_fn`: `Settings.eval_every` epochs, then the
evaluation) records the history, prints progress, saves checkpoints (`checkpoints=checkpoint.Policy(...)`:
resume from the latest one, periodic saves, the final save) and honours a stop request (SIGTERM/SIGINT inside
`checkpoint.preemption_guard()`: save, then raise `checkpoint.Preempted`), so no experiment can leave
checkpoints or preemption out.

Placement (`localmoe.sharding`): `placement=sharding.entries()` shards the entry axis over the local devices
(entries padded to a multiple of the device count, the padding dropped from the result);
`placement=sharding.data_parallel()` shards every training batch instead.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from localmoe import checkpoint as checkpoint_lib
from localmoe import sharding as sharding_lib
from localmoe.train import divergence, evaluation, initial, optimizer, step
from localmoe.train.settings import Settings
from localmoe.train.state import FitResult, FitState
from localmoe.train.task import METRICS, SPLITS, Data, Task


def pad_entries(tree: Any, total: int) -> Any:
  """Repeats the last entry along axis 0 until every leaf has `total` entries (numpy or jax arrays)."""

  def pad(a):
    n = a.shape[0]
    if n == total:
      return a
    index = np.minimum(np.arange(total), n - 1)
    return a[index] if isinstance(a, jax.Array) else np.asarray(a)[index]

  return jax.tree_util.tree_map(pad, tree)


def take_entries(tree: Any, n: int) -> Any:
  return jax.tree_util.tree_map(lambda a: a[:n], tree)


def _nanmean(values) -> float:
  """Mean of the finite values (NaN, without a warning, when there are none: a split not evaluated yet)."""
  values = np.asarray(values, np.float64)
  kept = values[np.isfinite(values)]
  return float(kept.mean()) if kept.size else float("nan")


def log_line(name, history, epoch, settings, splits, metric_names, elapsed) -> str:
  """One progress line: the mean (and for the last metric, the std) over entries of this epoch."""
  if tuple(metric_names) == METRICS and tuple(splits) == SPLITS:
    test_r2 = history[:, epoch, 1, 1]
    return (
      f"  [{name}] epoch {epoch + 1:>3}/{settings.epochs}  train mse {np.nanmean(history[:, epoch, 0, 0]):.4f}"
      f"  test mse {np.nanmean(history[:, epoch, 1, 0]):.4f}  test R2 {np.nanmean(test_r2):+.4f}"
      f" +- {np.nanstd(test_r2):.4f}  ({elapsed:.1f}s)"
    )
  parts = [
    f"{split} {metric} {_nanmean(history[:, epoch, k, m]):.4f}"
    for k, split in enumerate(splits)
    if split != "train" or k == 0
    for m, metric in enumerate(metric_names)
    if split != "train" or m == 0
  ]
  return f"  [{name}] epoch {epoch + 1:>3}/{settings.epochs}  " + "  ".join(parts) + f"  ({elapsed:.1f}s)"


def _place(data: Data, placement, total: int, entries: int) -> Data:
  """`data` on the placement's devices, per-seed arrays padded to `total` entries."""
  if placement is None:
    return data
  if total != entries and data.per_seed:
    data = dataclasses.replace(
      data,
      train=pad_entries(dict(data.train), total),
      test=pad_entries(dict(data.test), total),
      val=None if data.val is None else pad_entries(dict(data.val), total),
      frozen=pad_entries(data.frozen, total),
    )
  return placement.place_data(data)


def _record(fit_state: FitState, outputs, epoch0: int, epoch: int, entries: int, settings: Settings, state) -> FitState:
  """The FitState after one compiled call that ran epochs epoch0..epoch (its outputs copied to the host)."""
  evals, train_means, first, diagnostics = outputs
  history = fit_state.history.copy()
  history[:, epoch] = np.asarray(evals)[:entries]
  train_history = fit_state.train_history.copy()
  train_history[:, epoch0 : epoch + 1] = np.asarray(train_means)[:entries]
  initial_loss = fit_state.initial_loss if epoch0 else np.asarray(first, np.float32)[:entries]
  recorded = {}
  for key, value in diagnostics.items():
    value = np.asarray(value, np.float32)[:entries]  # [entries, ...]
    previous = fit_state.diagnostics.get(key)
    recorded[key] = (
      np.full((entries, settings.epochs, *value.shape[1:]), np.nan, np.float32) if previous is None else previous.copy()
    )
    recorded[key][:, epoch] = value
  return FitState(state, epoch + 1, history, train_history, recorded, initial_loss)


def _crossed(epoch0: int, epoch: int, every: int) -> bool:
  """Whether epochs epoch0+1 .. epoch+1 reach a multiple of `every`."""
  return bool(every) and (epoch + 1) // every > epoch0 // every


def _initial_diagnostics(task: Task, data: Data, seeds: Sequence[int], settings: Settings) -> dict:
  """Task.diagnostics of every entry's initial params {name: [entries, ...]} ({} without diagnostics).
  Initialisation is a function of the seed alone, so this is the same before and after a resume."""
  if task.diagnostics is None:
    return {}
  frozen_axis = 0 if data.per_seed else None

  def one_entry(key, frozen, test):
    params = task.init(jax.random.fold_in(key, 0), frozen)
    return evaluation.diagnostics(task, params, frozen, test, settings.eval_batch_size)

  out = jax.jit(jax.vmap(one_entry, in_axes=(0, frozen_axis, frozen_axis)))(
    initial.seed_keys(seeds), data.frozen, dict(data.test)
  )
  return {name: np.asarray(value, np.float32) for name, value in out.items()}


def fit(
  task: Task,
  data: Data,
  seeds: Sequence[int],
  settings: Settings,
  *,
  name: str = "model",
  learning_rate: Sequence[float] | float | None = None,
  weight_decay: Sequence[float] | float | None = None,
  checkpoints: "checkpoint_lib.Policy | None" = None,
  resume: FitState | None = None,
  on_epoch_end: Callable[[FitState], None] | None = None,
  log: Callable[[str], None] | None = print,
  placement: sharding_lib.Placement | None = None,
  step_fn: Callable[..., Any] = step.train_step,
) -> FitResult:
  """Trains every entry (seed, optionally with its own learning rate / weight decay) of one method.

  checkpoints: a `checkpoint.Policy` (directory, every_epochs, the run's config): resume from the latest
    good checkpoint in the directory (refused if it was made under another config), save every
    `every_epochs` epochs and at the end; None: no files. Either way a stop request (SIGTERM/SIGINT inside
    `checkpoint.preemption_guard()`) ends the fit at the next evaluation with `checkpoint.Preempted`, after
    saving when there is a directory.
  resume: continue from a FitState instead (e.g. one given to on_epoch_end); on_epoch_end: called after
    every compiled call (every `settings.eval_every` epochs) with the current FitState.
  placement: None (default device), `sharding.entries()` (entry axis over the local devices) or
    `sharding.data_parallel()` (every batch split over the devices). FitStates given to on_epoch_end and
    taken by resume never include the padding entries that `entries()` adds.
  step_fn: the optimiser step, `train_step` by default. A fork passes its own (same signature as
    `train_step`; it gets a trailing rng argument only for a task with `Task.rngs`); it changes this fit
    and no other.
  Parameter groups (`settings.groups`): a rule matching no parameter is a ValueError before any compute; the
  groups' parameter counts are logged once.
  Returns the history of all entries.
  """
  if not callable(step_fn):
    raise TypeError(
      f"step_fn={step_fn!r} is not callable: pass a step with train_step's signature "
      "(task, tx, state, frozen, inputs, y, mask, global_step[, rng]), or leave the default."
    )
  start = time.perf_counter()
  seeds = list(seeds)
  entries = len(seeds)
  settings.check_batch(data.num_train)
  if placement is not None:
    placement.check_batch(settings.batch_size)
  if settings.groups:
    frozen_one = jax.tree_util.tree_map(lambda a: a[0], data.frozen) if data.per_seed else data.frozen
    shapes = jax.eval_shape(lambda key, frozen: task.init(key, frozen), jax.random.PRNGKey(0), frozen_one)
    sizes = optimizer.group_sizes(settings, shapes)
    if log:
      log(f"  [{name}] parameter groups: {optimizer.describe_groups(settings, sizes)}")
  ckpt = None
  if checkpoints is not None and checkpoints.directory is not None:
    ckpt = checkpoint_lib.Checkpointer.open(checkpoints, settings.epochs, name=name, log=log)
  if resume is None and ckpt is not None:
    unplaced = data
    resume = ckpt.restore(
      lambda: initial.fit_state_template(task, unplaced, seeds, settings, learning_rate, weight_decay)
    )
    if resume is not None and log:
      log(f"  [{name}] resuming from the checkpoint at epoch {resume.epoch}/{settings.epochs}")
  initial_diagnostics = _initial_diagnostics(task, data, seeds, settings)
  lr, wd = initial.entry_hyperparams(settings, entries, learning_rate, weight_decay)
  total = entries if placement is None else placement.padded(entries)
  padded_seeds = seeds + [seeds[-1]] * (total - entries)
  data = _place(data, placement, total, entries)
  epoch_fn, steps = step.build_epoch_fn(task, settings, data.num_train, data.per_seed, placement, step_fn)
  keys = initial.seed_keys(padded_seeds)
  if placement is not None:
    keys = jax.device_put(keys, placement.entry_sharding())
  if resume is None:
    fit_state = FitState(
      initial.init_state(task, data, padded_seeds, pad_entries(lr, total), pad_entries(wd, total), settings, placement),
      0,
      initial.empty_history(task, data, entries, settings),
    )
  else:
    state = resume.state
    if placement is not None:
      state = jax.device_put(pad_entries(state, total), placement.entry_sharding())
    fit_state = dataclasses.replace(resume, state=state)
  fit_state = dataclasses.replace(
    fit_state,
    diagnostics=fit_state.diagnostics or {},
    train_history=(
      initial.empty_train_history(task, entries, settings)
      if fit_state.train_history is None
      else fit_state.train_history
    ),
    initial_loss=(
      np.full((entries,), np.nan, np.float32) if fit_state.initial_loss is None else fit_state.initial_loss
    ),
  )
  log_every = settings.log_every or max(1, settings.epochs // 5)
  unpadded = (
    (lambda fs: fs) if total == entries else (lambda fs: dataclasses.replace(fs, state=take_entries(fs.state, entries)))
  )
  every = checkpoints.every_epochs if checkpoints is not None else 0

  while fit_state.epoch < settings.epochs:
    epoch0 = fit_state.epoch
    epoch = epoch0 + settings.eval_every - 1  # the evaluated epoch
    state, outputs = epoch_fn(fit_state.state, keys, epoch0, data.frozen, data.train, data.test, data.val)
    fit_state = _record(fit_state, outputs, epoch0, epoch, entries, settings, state)
    if log and (_crossed(epoch0, epoch, log_every) or epoch + 1 == settings.epochs or epoch0 == 0):
      log(
        log_line(name, fit_state.history, epoch, settings, data.splits, task.metric_names, time.perf_counter() - start)
      )
    if on_epoch_end is not None:
      on_epoch_end(unpadded(fit_state))
    last = fit_state.epoch == settings.epochs
    stop = checkpoint_lib.stop_requested() and not last
    saved = ckpt is not None and (last or stop or _crossed(epoch0, epoch, every)) and ckpt.save(unpadded(fit_state))
    if stop:
      where = (
        f"checkpoint saved at epoch {fit_state.epoch} in {ckpt.directory}"
        if saved
        else f"stopped at epoch {fit_state.epoch}, nothing saved"
        + (" (the checkpoint save failed)" if ckpt else " (no checkpoint directory)")
      )
      raise checkpoint_lib.Preempted(f"[{name}] {where}")

  diverged_step = np.asarray(fit_state.state["diverged_step"])[:entries]
  status = divergence.statuses(fit_state, seeds, diverged_step, steps, name, log)
  params = fit_state.state["params"] if total == entries else take_entries(fit_state.state["params"], entries)
  return FitResult(
    params=params,
    history=fit_state.history,
    status=status,
    diverged_step=diverged_step,
    wall_time_s=time.perf_counter() - start,
    splits=data.splits,
    metric_names=tuple(task.metric_names),
    train_history=fit_state.train_history,
    train_names=task.train_names,
    diagnostics=fit_state.diagnostics,
    initial_diagnostics=initial_diagnostics,
  )
