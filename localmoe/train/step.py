"""The step: the objective of one batch (`loss_and_aux`), one optimiser step with the divergence guard
(`train_step`, the default step; a fork passes its own to `fit(..., step_fn=...)`), the batches of an epoch,
and the compiled program that runs `Settings.eval_every` epochs and then evaluates (`build_epoch_fn`).

One call of the program runs lax.scan over epochs and lax.scan over steps, each epoch shuffled with key =
fold_in(fold_in(seed key, 1), epoch), so a resumed run reproduces the same order; all entries are vmapped.
A task that declares rng streams (`Task.rngs`) gets per step the key fold_in(fold_in(seed key, 2), global
step): a function of the seed and the step alone, so a resumed run draws the same noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from localmoe import sharding as sharding_lib
from localmoe.train import evaluation, optimizer
from localmoe.train.evaluation import split_inputs
from localmoe.train.settings import Settings
from localmoe.train.task import Batch, Task


def loss_and_aux(
  task: Task, params, frozen, inputs: Batch, y: jax.Array, mask: jax.Array, rng: jax.Array | None = None, step=None
):
  """The training objective of one batch and its aux outputs.

  Returns (objective, aux_vector): objective = masked mean of the per-example task loss (squared error by
  default) + aux["aux_loss"] (if the task returns one); aux_vector [len(task.aux_names)] the aux scalars.
  mask [batch]: 1 for real rows, 0 for the padding of a pass's last batch. rng: this step's key, split into
  the task's rng streams (`Task.rngs`; ignored without them); step: the global step (`Task.takes_step`).
  """
  out = task.call(params, frozen, inputs, rng, step)
  pred, aux = out if task.aux_names else (out, {})
  if task.loss is None:
    per_example = ((pred - y) ** 2).reshape(y.shape[0], -1).mean(-1)  # [batch]
  else:
    per_example = task.loss(pred, y)  # [batch]
  objective = jnp.sum(per_example * mask) / jnp.sum(mask)
  if "aux_loss" in aux:
    objective = objective + aux["aux_loss"]
  values = (
    jnp.stack([jnp.asarray(aux[n], jnp.float32) for n in task.aux_names])
    if task.aux_names
    else (jnp.zeros((0,), jnp.float32))
  )
  return objective, values


def train_step(
  task: Task,
  tx: optax.GradientTransformation,
  state,
  frozen,
  inputs: Batch,
  y: jax.Array,
  mask: jax.Array,
  global_step: jax.Array,
  rng: jax.Array | None = None,
):
  """One optimiser step of one entry, with the divergence guard.

  state: {"params", "opt_state", "alive", "diverged_step"}. A non-finite objective freezes the entry: its
  params and optimiser state stop changing and `diverged_step` records the global step. rng: this step's
  key for the task's rng streams; the trainer passes it only to a task with `Task.rngs`, so a step written
  without the argument still works for every other task.
  Returns (state, [objective, *aux]) for this step.
  """
  (objective, aux), grads = jax.value_and_grad(
    lambda p: loss_and_aux(task, p, frozen, inputs, y, mask, rng, global_step), has_aux=True
  )(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  finite = jnp.isfinite(objective)
  proceed = finite & state["alive"]
  keep_new = lambda new, old: jnp.where(proceed, new, old)
  state = {
    "params": jax.tree_util.tree_map(keep_new, params, state["params"]),
    "opt_state": jax.tree_util.tree_map(keep_new, opt_state, state["opt_state"]),
    "alive": proceed,
    "diverged_step": jnp.where(state["alive"] & ~finite, global_step, state["diverged_step"]),
  }
  return state, jnp.concatenate([objective[None].astype(jnp.float32), aux])


def epoch_batches(seed_key: jax.Array, epoch, num_train: int, settings: Settings):
  """Row indices [steps, batch] and masks [steps, batch] of one epoch's batches.

  steps_per_epoch=0: pass `epoch` in the order permutation(fold_in(seed_key, epoch)), its last batch padded
  with repeated rows that the mask drops. steps_per_epoch=n: steps [epoch*n, (epoch+1)*n) of the endless
  stream of such passes (pass p shuffled with fold_in(seed_key, p)); a resumed run replays the same batches.
  """
  batch_size = settings.batch_size
  per_pass = settings.steps_per_pass(num_train)
  pad = per_pass * batch_size - num_train
  keep = (jnp.arange(per_pass * batch_size) < num_train).reshape(per_pass, batch_size)

  def one_pass(index):
    order = jax.random.permutation(jax.random.fold_in(seed_key, index), num_train)
    return jnp.concatenate([order, order[:pad]]).reshape(per_pass, batch_size)  # [per_pass, batch]

  if not settings.steps_per_epoch:
    return one_pass(epoch), keep
  steps = settings.steps_per_epoch
  position = epoch * steps + jnp.arange(steps)  # global step indices
  first = (epoch * steps) // per_pass
  orders = jnp.stack([one_pass(first), one_pass(first + 1)])  # an epoch spans <= 2 passes
  which, row = position // per_pass - first, position % per_pass
  return orders[which, row], keep[row]


def total_steps(settings: Settings, num_train: int) -> int:
  """Optimiser steps of the whole run (the horizon of the learning-rate schedule)."""
  return settings.epochs * settings.steps(num_train)


def build_epoch_fn(
  task: Task,
  settings: Settings,
  num_train: int,
  per_seed: bool,
  placement: sharding_lib.Placement | None = None,
  step_fn=train_step,
):
  """Returns jit(vmap(eval_every epochs, then evaluate)) and the steps per epoch.

  step_fn: the step (default `train_step`; a fork's own, same signature).
  The function: (state, seed_keys, epoch0, frozen, train, test, val) -> (state, outputs), seed_keys the
  entries' `initial.seed_keys` (shuffling uses fold_in(key, 1), the task's rngs fold_in(key, 2)), epochs
  epoch0 .. epoch0 + eval_every - 1. outputs: ([entries, splits, metrics] for the splits train, (val, if not
  None), test after the last of them; [entries, eval_every, len(task.train_names)] epoch means of the
  objective and aux outputs; [entries] the objective of the first step; {name: [entries, ...]} diagnostics).
  """
  steps = settings.steps(num_train)
  tx = optimizer.make_optimizer(settings, total_steps(settings, num_train))
  constrain_batch = placement.constrain_batch if placement is not None else (lambda tree: tree)

  def one_entry(state, seed_key, epoch0, frozen, train, test, val):
    shuffle_key, noise_key = jax.random.fold_in(seed_key, 1), jax.random.fold_in(seed_key, 2)

    def one_epoch(state, j):
      epoch = epoch0 + j
      order, keep = epoch_batches(shuffle_key, epoch, num_train, settings)  # [steps, batch] each

      def step(state, args):
        rows, mask, step_index = args
        inputs, y = split_inputs(constrain_batch(jax.tree_util.tree_map(lambda a: a[rows], train)))
        global_step = epoch * steps + step_index
        if task.rngs:  # the task's noise: a function of (seed, global step)
          return step_fn(
            task, tx, state, frozen, inputs, y, mask, global_step, jax.random.fold_in(noise_key, global_step)
          )
        return step_fn(task, tx, state, frozen, inputs, y, mask, global_step)

      state, per_step = jax.lax.scan(step, state, (order, keep, jnp.arange(steps)))  # [steps, 1 + aux]
      return state, (per_step.mean(0), per_step[0, 0])

    state, (means, first) = jax.lax.scan(one_epoch, state, jnp.arange(settings.eval_every))
    if settings.eval_train_rows:
      train = jax.tree_util.tree_map(lambda a: a[: settings.eval_train_rows], train)
    taken = (epoch0 + settings.eval_every) * steps  # global steps taken
    evaluate = lambda split: evaluation.evaluate(task, state["params"], frozen, split, settings.eval_batch_size, taken)
    evals = [evaluate(train)] + ([] if val is None else [evaluate(val)])
    if settings.test_at_end:  # the test split at the last evaluation only (NaN before)
      last = epoch0 + settings.eval_every >= settings.epochs
      evals.append(jax.lax.cond(last, lambda: evaluate(test), lambda: jnp.full_like(evals[0], jnp.nan)))
    else:
      evals.append(evaluate(test))
    evals = jnp.stack(evals)  # [splits, metrics]
    diagnostics = evaluation.diagnostics(task, state["params"], frozen, test, settings.eval_batch_size)
    return state, (evals, means, first[0], diagnostics)

  data_axis = 0 if per_seed else None
  mapped = jax.vmap(one_entry, in_axes=(0, 0, None, data_axis, data_axis, data_axis, data_axis))
  if placement is None:
    return jax.jit(mapped, donate_argnums=(0,)), steps
  out = placement.entry_sharding()
  return jax.jit(mapped, donate_argnums=(0,), out_shardings=(out, out)), steps
