"""The trainer shared by every experiment: AdamW from `config.optim`, compiled epochs, vmap over seeds.

All seeds (or sweep entries) of one method train together in one compiled program: the train state carries
a leading entry axis and `jax.vmap` maps the epochs over it. Each entry has its own seed and, optionally, its
own learning rate and weight decay (they live in the optimiser state via `optax.inject_hyperparams`), so
a learning-rate sweep compiles once. The optimiser (`make_optimizer`) is built from the settings: AdamW,
an optional learning-rate schedule (a multiplier of each entry's rate) and global-norm gradient clipping.

One call of the jit-compiled program runs `Settings.eval_every` epochs (lax.scan over epochs, lax.scan over
steps; each epoch shuffled with key = fold_in(seed key, epoch), so a resumed run reproduces the same order)
and then evaluates the task's metrics (MSE and R^2 by default) on every split. The Python loop between calls
records the history, prints progress, saves checkpoints (`checkpoints=checkpoint.Policy(...)`: resume from
the latest one, periodic saves, the final save) and honours a stop request (SIGTERM/SIGINT inside
`checkpoint.preemption_guard()`: save, then raise `checkpoint.Preempted`). Every experiment trains through
this one loop, so none can leave checkpoints or preemption out. The step is the module-level `train_step`
(its objective `loss_and_aux`): a fork changes it in one place.

Regression is the default (squared-error loss; MSE and R^2 per split). A Task may instead bring its own
per-example loss and metrics (e.g. cross-entropy and accuracy for classification), and Data may carry a
validation split ("train", "val", "test"); FitResult.splits / .metric_names then say what the history holds.

Placement (`localmoe.sharding`): `fit(..., placement=sharding.entries())` shards the entry axis over the
local devices (one NamedSharding, jit rather than pmap; entries are padded to a multiple of the device count
and the padding is dropped from the result); `placement=sharding.data_parallel()` instead shards every
training batch over the devices (one large run). Results equal the single-device ones up to float rounding.

A non-finite loss freezes that entry (its parameters stop changing) and records the global step; the other
entries carry on. `FitResult.status` then reads "diverged at epoch E" for it. A finite blow-up is flagged
the same way: an entry whose epoch-mean training objective rose above BLOWUP_FACTOR times its initial value
(the objective of its very first step) and ends above that initial value, or whose final metrics are not
finite, reads "diverged at epoch E (training loss grew from a to b, ...)", E the first epoch past the factor.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from localmoe import checkpoint as checkpoint_lib
from localmoe import metrics
from localmoe import sharding as sharding_lib

Params = Any
Batch = Mapping[str, jax.Array]

SPLITS = ("train", "test")
METRICS = ("mse", "r2")
SCHEDULES = ("constant", "cosine", "linear")
BLOWUP_FACTOR = 100.0     # final training objective above this multiple of the initial one: "diverged"


@dataclasses.dataclass(frozen=True)
class Task:
  """What to train.

  init(key, frozen) -> trainable params of one entry.
  predict(params, frozen, inputs) -> predictions [batch, ...] for a batch dict `inputs` (every data key but
    "y"; e.g. {"x": [batch, d_in], "context": [batch, D]}). `frozen` holds constants that are not trained
    (a frozen base weight W0, a pretrained backbone).
  loss(pred, y) -> per-example loss [batch] (optional; None: squared error averaged over the outputs).
  metric_names / per_example_metrics(pred, y) -> [batch, len(metric_names)]: metrics averaged over every
    example of a split (optional; None: ("mse", "r2") of regression, R^2 against each split's own SST).
  aux_names: a loss with aux outputs. When non-empty, `predict` returns (pred, aux) with `aux` a dict holding
    one scalar per name; the entry "aux_loss", if present, is added to the task loss (already weighted, e.g.
    the router load-balance and z-losses of `localmoe.inject.router_losses`). Every aux scalar is averaged
    over the steps of each epoch into FitResult.train_history (next to the training loss).
  diagnostics(params, frozen, inputs) -> {name: array}: optional, computed at every evaluation on the first
    `eval_batch_size` examples of the test split (e.g. expert usage per layer, cell and task); stored in
    FitResult.diagnostics[name] with shape [entries, epochs, ...].
  """
  init: Callable[[jax.Array, Any], Params]
  predict: Callable[[Params, Any, Batch], Any]
  loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  metric_names: tuple[str, ...] = ("mse", "r2")
  per_example_metrics: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  aux_names: tuple[str, ...] = ()
  diagnostics: Callable[[Params, Any, Batch], Mapping[str, jax.Array]] | None = None

  def __post_init__(self):
    if self.per_example_metrics is None and tuple(self.metric_names) != METRICS:
      raise ValueError(f"Task.metric_names={self.metric_names!r} needs Task.per_example_metrics (a function "
                       f"(pred, y) -> [batch, {len(self.metric_names)}]); without it the metrics are {METRICS}.")
    if "loss" in self.aux_names:
      raise ValueError("Task.aux_names may not contain 'loss': the trainer records the training loss itself "
                       "as train_history[..., 0]; name the aux output differently.")

  @property
  def train_names(self) -> tuple[str, ...]:
    """Columns of FitResult.train_history: the training objective, then every aux output."""
    return ("loss", *self.aux_names)

  def predictions(self, params, frozen, inputs: Batch) -> jax.Array:
    """`predict` without its aux outputs (what evaluation uses)."""
    out = self.predict(params, frozen, inputs)
    return out[0] if self.aux_names else out


@dataclasses.dataclass(frozen=True)
class Data:
  """Train/test arrays (dicts with a target "y"), an optional validation split, and frozen constants.

  per_seed=True: every array of train, test and frozen has a leading entry axis (one replicate per seed,
  e.g. a new target matrix per seed); otherwise all entries share them.
  """
  train: Mapping[str, Any]
  test: Mapping[str, Any]
  frozen: Any = None
  per_seed: bool = False
  val: Mapping[str, Any] | None = None   # optional validation split, evaluated every epoch like test

  @property
  def splits(self) -> tuple[str, ...]:
    """Names of the evaluated splits, in history order."""
    return SPLITS if self.val is None else ("train", "val", "test")

  @property
  def num_train(self) -> int:
    y = self.train["y"]
    return int(y.shape[1] if self.per_seed else y.shape[0])


@dataclasses.dataclass(frozen=True)
class Settings:
  """Optimisation settings (the `config.optim` block of an experiment; `from_config` reads it)."""
  epochs: int
  batch_size: int
  learning_rate: float
  weight_decay: float = 0.01          # PyTorch's AdamW default
  b1: float = 0.9
  b2: float = 0.999
  eval_batch_size: int = 8192         # evaluation is chunked to bound memory
  log_every: int = 0                  # print progress every n epochs (0: about 5 lines per run)
  steps_per_epoch: int = 0            # 0: an epoch is one pass over the training set; n: an "epoch" is n
                                      # steps of an endless stream of passes (evaluate every n steps)
  eval_every: int = 1                 # epochs per compiled call; evaluate (log, checkpoint, stop) after each
  schedule: str = "constant"          # learning-rate multiplier over training: constant, cosine or linear
                                      # (to 0 at the last step), after `warmup_steps` of linear warmup
  warmup_steps: int = 0
  grad_clip: float = 0.0              # clip gradients to this global norm (0: no clipping)
  eval_train_rows: int = 0            # evaluate the training split on its first n rows only (0: all rows);
                                      # for long streams, where a full pass per evaluation costs more than
                                      # training (put a fixed, representative subset first)

  def check_batch(self, num_train: int) -> None:
    if self.batch_size > num_train:
      raise ValueError(f"config.optim.batch_size={self.batch_size} is larger than the training set "
                       f"({num_train} samples): use batch_size <= {num_train}.")
    if self.eval_train_rows > num_train:
      raise ValueError(f"config.optim.eval_train_rows={self.eval_train_rows} is more than the training set "
                       f"({num_train} rows): use eval_train_rows <= {num_train}, or 0 for all of them.")
    if self.steps_per_epoch > self.steps_per_pass(num_train):
      raise ValueError(f"config.optim.steps_per_epoch={self.steps_per_epoch} is more than one pass over the "
                       f"training set ({self.steps_per_pass(num_train)} steps of {self.batch_size}): use "
                       f"steps_per_epoch <= {self.steps_per_pass(num_train)}, or 0 for whole passes.")

  def __post_init__(self):
    for field in ("epochs", "batch_size", "eval_batch_size", "eval_every"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.optim.{_CONFIG_NAMES.get(field, field)}={value!r} must be a positive integer.")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"config.optim.lr={self.learning_rate!r} must be > 0 and finite (e.g. 1e-3).")
    if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
      raise ValueError(f"config.optim.weight_decay={self.weight_decay!r} must be >= 0 and finite.")
    for field in ("b1", "b2"):
      if not 0 <= getattr(self, field) < 1:
        raise ValueError(f"config.optim.{field}={getattr(self, field)!r} must lie in [0, 1).")
    if self.log_every < 0:
      raise ValueError(f"config.optim.log_every={self.log_every!r} must be >= 0.")
    if not isinstance(self.steps_per_epoch, int) or self.steps_per_epoch < 0:
      raise ValueError(f"config.optim.steps_per_epoch={self.steps_per_epoch!r} must be an integer >= 0 "
                       "(0: one pass over the training set per epoch).")
    if self.epochs % self.eval_every:
      raise ValueError(f"config.optim.epochs={self.epochs} is not a multiple of config.optim.eval_every="
                       f"{self.eval_every}: make it one (the last epoch must be evaluated).")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"config.optim.schedule={self.schedule!r} is not known; valid: {list(SCHEDULES)}.")
    if not isinstance(self.eval_train_rows, int) or isinstance(self.eval_train_rows, bool) or \
        self.eval_train_rows < 0:
      raise ValueError(f"config.optim.eval_train_rows={self.eval_train_rows!r} must be an integer >= 0 "
                       "(0: evaluate every training row).")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"config.optim.warmup_steps={self.warmup_steps!r} must be an integer >= 0.")
    if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
      raise ValueError(f"config.optim.grad_clip={self.grad_clip!r} must be >= 0 (0: no clipping).")

  def steps_per_pass(self, num_train: int) -> int:
    """Steps of one pass over the training set (the last batch is padded and masked)."""
    return math.ceil(num_train / self.batch_size)

  def steps(self, num_train: int) -> int:
    """Training steps between two evaluations."""
    return self.steps_per_epoch or self.steps_per_pass(num_train)

  @classmethod
  def from_config(cls, optim) -> "Settings":
    """From a `config.optim` block; its `lr` key is the learning rate. An unknown key is an error."""
    values = dict(optim.to_dict() if hasattr(optim, "to_dict") else optim)
    fields = {f.name for f in dataclasses.fields(cls)}
    renamed = {_SETTINGS_NAMES.get(k, k): v for k, v in values.items()}
    unknown = sorted(k for k, v in values.items() if _SETTINGS_NAMES.get(k, k) not in fields)
    if unknown:
      valid = sorted(_CONFIG_NAMES.get(f, f) for f in fields)
      raise ValueError(f"config.optim has unknown key(s) {unknown} that the trainer would ignore; valid: {valid}.")
    return cls(**renamed)


_CONFIG_NAMES = {"learning_rate": "lr"}                       # Settings field -> config.optim key
_SETTINGS_NAMES = {v: k for k, v in _CONFIG_NAMES.items()}


@dataclasses.dataclass
class FitState:
  """Everything needed to continue training: the vmapped train state and the history so far."""
  state: Any                      # pytree with leading entry axis: params, opt_state, alive, diverged_step
  epoch: int                      # epochs completed
  history: np.ndarray             # [entries, epochs, splits, metrics], NaN where not yet run
  train_history: np.ndarray | None = None   # [entries, epochs, len(task.train_names)] epoch means
  diagnostics: dict[str, np.ndarray] | None = None   # name -> [entries, epochs, ...] (Task.diagnostics)
  initial_loss: np.ndarray | None = None    # [entries] objective of the first step (the blow-up reference)


@dataclasses.dataclass
class FitResult:
  """Outcome of `fit` for one method: final params and per-epoch history of every entry."""
  params: Params                  # leading entry axis
  history: np.ndarray             # [entries, epochs, len(splits), len(metric_names)]
  status: list[str]               # "ok" or "diverged at epoch E" per entry
  diverged_step: np.ndarray       # [entries] global step of the first non-finite loss, -1 if none
  wall_time_s: float
  splits: tuple[str, ...] = SPLITS            # axis 2 of history (Data.splits)
  metric_names: tuple[str, ...] = METRICS     # axis 3 of history (Task.metric_names)
  train_history: np.ndarray | None = None     # [entries, epochs, len(train_names)]: loss and aux, epoch means
  train_names: tuple[str, ...] = ("loss",)    # axis 2 of train_history (Task.train_names)
  diagnostics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)   # [entries, epochs, ...]

  def _index(self, split: str, metric: str) -> tuple[int, int]:
    if split not in self.splits or metric not in self.metric_names:
      raise KeyError(f"history has splits {self.splits} and metrics {self.metric_names}; "
                     f"asked for ({split!r}, {metric!r}).")
    return self.splits.index(split), self.metric_names.index(metric)

  def final(self, split: str, metric: str) -> np.ndarray:
    """Last-epoch value per entry: [entries]."""
    return self.history[:, -1, *self._index(split, metric)]

  def curve(self, split: str, metric: str) -> np.ndarray:
    """Per-epoch values: [entries, epochs]."""
    return self.history[:, :, *self._index(split, metric)]

  def entry(self, k: int) -> "FitResult":
    """Entry k alone (leading axes of size 1), e.g. to write one sweep entry's files."""
    take = lambda a: a[k:k + 1]
    return dataclasses.replace(self, params=jax.tree_util.tree_map(take, self.params), history=take(self.history),
                               status=[self.status[k]], diverged_step=take(self.diverged_step),
                               train_history=None if self.train_history is None else take(self.train_history),
                               diagnostics={n: take(v) for n, v in self.diagnostics.items()})


def lr_multiplier(settings: Settings, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """The schedule of `settings` as a multiplier of each entry's learning rate, step -> [0, 1]."""
  decay_steps = max(1, total_steps - settings.warmup_steps)
  decay = {"constant": optax.constant_schedule(1.0),
           "cosine": optax.cosine_decay_schedule(1.0, decay_steps),
           "linear": optax.linear_schedule(1.0, 0.0, decay_steps)}[settings.schedule]
  if not settings.warmup_steps:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, settings.warmup_steps), decay],
                              [settings.warmup_steps])


def make_optimizer(settings: Settings | None = None, total_steps: int = 1) -> optax.GradientTransformation:
  """AdamW (hyperparameters in the optimiser state, so they can differ per entry), built from `settings`.

  grad_clip > 0 clips the gradients' global norm first; a schedule other than "constant" (or a warmup)
  multiplies every update by lr_multiplier(step), i.e. each entry's learning rate follows the schedule.
  Without either it is the bare `inject_hyperparams(adamw)` (see `_hyperparams` for where the rates live).
  """
  b1, b2 = (0.9, 0.999) if settings is None else (settings.b1, settings.b2)
  adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0, b1=b1, b2=b2)
  if settings is None or (not settings.grad_clip and settings.schedule == "constant"
                          and not settings.warmup_steps):
    return adamw
  clip = optax.clip_by_global_norm(settings.grad_clip) if settings.grad_clip else optax.identity()
  return optax.chain(clip, adamw, optax.scale_by_schedule(lr_multiplier(settings, total_steps)))


def _hyperparams(opt_state) -> dict:
  """The `inject_hyperparams` dict inside an optimiser state of `make_optimizer` (bare or chained)."""
  if hasattr(opt_state, "hyperparams"):
    return opt_state.hyperparams
  return opt_state[1].hyperparams


def _split_inputs(batch: Batch) -> tuple[Batch, jax.Array]:
  inputs = {k: v for k, v in batch.items() if k != "y"}
  return inputs, batch["y"]


def _chunked_metrics(predict, params, frozen, split: Batch, chunk: int) -> jax.Array:
  """[mse, r2] on a whole split, predicting in chunks of `chunk` rows."""
  inputs, y = _split_inputs(jax.tree_util.tree_map(jnp.asarray, dict(split)))
  n = y.shape[0]
  if n <= chunk:
    pred = predict(params, frozen, inputs)
    return jnp.stack([metrics.mse(pred, y), metrics.r2(pred, y)])
  steps = math.ceil(n / chunk)
  idx = jnp.minimum(jnp.arange(steps * chunk), n - 1).reshape(steps, chunk)
  valid = (jnp.arange(steps * chunk) < n).reshape(steps, chunk)

  def sse_of_chunk(args):
    rows, keep = args
    pred = predict(params, frozen, jax.tree_util.tree_map(lambda a: a[rows], inputs))
    err = ((pred - y[rows]) ** 2).reshape(chunk, -1).sum(-1)
    return jnp.sum(jnp.where(keep, err, 0.0))

  sse = jax.lax.map(sse_of_chunk, (idx, valid)).sum()
  return jnp.stack([sse / y.size, 1.0 - sse / metrics.sum_squares_total(y)])


def _chunked_means(per_example, predict, params, frozen, split: Batch, chunk: int) -> jax.Array:
  """Mean over a whole split of per-example metrics [batch, k] -> [k], predicting in chunks of `chunk` rows."""
  inputs, y = _split_inputs(jax.tree_util.tree_map(jnp.asarray, dict(split)))
  n = y.shape[0]
  if n <= chunk:
    return jnp.mean(per_example(predict(params, frozen, inputs), y), axis=0)
  steps = math.ceil(n / chunk)
  idx = jnp.minimum(jnp.arange(steps * chunk), n - 1).reshape(steps, chunk)
  valid = (jnp.arange(steps * chunk) < n).reshape(steps, chunk)

  def sums_of_chunk(args):
    rows, keep = args
    values = per_example(predict(params, frozen, jax.tree_util.tree_map(lambda a: a[rows], inputs)), y[rows])
    return jnp.sum(jnp.where(keep[:, None], values, 0.0), axis=0)             # [k]

  return jax.lax.map(sums_of_chunk, (idx, valid)).sum(0) / n


def _evaluate(task: Task, params, frozen, split: Batch, chunk: int) -> jax.Array:
  """The task's metrics on one split: [len(task.metric_names)]."""
  if task.per_example_metrics is None:
    return _chunked_metrics(task.predictions, params, frozen, split, chunk)
  return _chunked_means(task.per_example_metrics, task.predictions, params, frozen, split, chunk)


def _diagnostics(task: Task, params, frozen, split: Batch, chunk: int) -> dict[str, jax.Array]:
  """Task.diagnostics on the first `chunk` examples of a split ({} without diagnostics)."""
  if task.diagnostics is None:
    return {}
  inputs, _ = _split_inputs(jax.tree_util.tree_map(lambda a: jnp.asarray(a)[:chunk], dict(split)))
  return dict(task.diagnostics(params, frozen, inputs))


# ------------------------------------------------------------------------------------------- the step


def loss_and_aux(task: Task, params, frozen, inputs: Batch, y: jax.Array, mask: jax.Array):
  """The training objective of one batch and its aux outputs.

  Returns (objective, aux_vector): objective = masked mean of the per-example task loss (squared error by
  default) + aux["aux_loss"] (if the task returns one); aux_vector [len(task.aux_names)] the aux scalars.
  mask [batch]: 1 for real rows, 0 for the padding of a pass's last batch.
  """
  out = task.predict(params, frozen, inputs)
  pred, aux = out if task.aux_names else (out, {})
  if task.loss is None:
    per_example = ((pred - y) ** 2).reshape(y.shape[0], -1).mean(-1)               # [batch]
  else:
    per_example = task.loss(pred, y)                                                # [batch]
  objective = jnp.sum(per_example * mask) / jnp.sum(mask)
  if "aux_loss" in aux:
    objective = objective + aux["aux_loss"]
  values = jnp.stack([jnp.asarray(aux[n], jnp.float32) for n in task.aux_names]) if task.aux_names else (
      jnp.zeros((0,), jnp.float32))
  return objective, values


def train_step(task: Task, tx: optax.GradientTransformation, state, frozen, inputs: Batch, y: jax.Array,
               mask: jax.Array, global_step: jax.Array):
  """One optimiser step of one entry, with the divergence guard.

  state: {"params", "opt_state", "alive", "diverged_step"}. A non-finite objective freezes the entry: its
  params and optimiser state stop changing and `diverged_step` records the global step.
  Returns (state, [objective, *aux]) for this step.
  """
  (objective, aux), grads = jax.value_and_grad(
      lambda p: loss_and_aux(task, p, frozen, inputs, y, mask), has_aux=True)(state["params"])
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
    return jnp.concatenate([order, order[:pad]]).reshape(per_pass, batch_size)      # [per_pass, batch]

  if not settings.steps_per_epoch:
    return one_pass(epoch), keep
  steps = settings.steps_per_epoch
  position = epoch * steps + jnp.arange(steps)                                      # global step indices
  first = (epoch * steps) // per_pass
  orders = jnp.stack([one_pass(first), one_pass(first + 1)])                         # an epoch spans <= 2 passes
  which, row = position // per_pass - first, position % per_pass
  return orders[which, row], keep[row]


def total_steps(settings: Settings, num_train: int) -> int:
  """Optimiser steps of the whole run (the horizon of the learning-rate schedule)."""
  return settings.epochs * settings.steps(num_train)


def _build_epoch_fn(task: Task, settings: Settings, num_train: int, per_seed: bool,
                    placement: sharding_lib.Placement | None = None):
  """Returns jit(vmap(eval_every epochs, then evaluate)) and the steps per epoch.

  The function: (state, seed_keys, epoch0, frozen, train, test, val) -> (state, outputs), epochs
  epoch0 .. epoch0 + eval_every - 1. outputs: ([entries, splits, metrics] for the splits train, (val, if not
  None), test after the last of them; [entries, eval_every, len(task.train_names)] epoch means of the
  objective and aux outputs; [entries] the objective of the first step; {name: [entries, ...]} diagnostics).
  """
  steps = settings.steps(num_train)
  tx = make_optimizer(settings, total_steps(settings, num_train))
  constrain_batch = placement.constrain_batch if placement is not None else (lambda tree: tree)

  def one_entry(state, seed_key, epoch0, frozen, train, test, val):
    def one_epoch(state, j):
      epoch = epoch0 + j
      order, keep = epoch_batches(seed_key, epoch, num_train, settings)             # [steps, batch] each

      def step(state, args):
        rows, mask, step_index = args
        inputs, y = _split_inputs(constrain_batch(jax.tree_util.tree_map(lambda a: a[rows], train)))
        return train_step(task, tx, state, frozen, inputs, y, mask, epoch * steps + step_index)

      state, per_step = jax.lax.scan(step, state, (order, keep, jnp.arange(steps)))  # [steps, 1 + aux]
      return state, (per_step.mean(0), per_step[0, 0])

    state, (means, first) = jax.lax.scan(one_epoch, state, jnp.arange(settings.eval_every))
    if settings.eval_train_rows:
      train = jax.tree_util.tree_map(lambda a: a[:settings.eval_train_rows], train)
    splits = (train, test) if val is None else (train, val, test)
    evals = jnp.stack([_evaluate(task, state["params"], frozen, split, settings.eval_batch_size)
                       for split in splits])                                         # [splits, metrics]
    diagnostics = _diagnostics(task, state["params"], frozen, test, settings.eval_batch_size)
    return state, (evals, means, first[0], diagnostics)

  data_axis = 0 if per_seed else None
  mapped = jax.vmap(one_entry, in_axes=(0, 0, None, data_axis, data_axis, data_axis, data_axis))
  if placement is None:
    return jax.jit(mapped, donate_argnums=(0,)), steps
  out = placement.entry_sharding()
  return jax.jit(mapped, donate_argnums=(0,), out_shardings=(out, out)), steps


def seed_keys(seeds: Sequence[int]) -> jax.Array:
  """One PRNG key per entry; init uses fold_in(key, 0), shuffling fold_in(key, 1)."""
  return jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])


def entry_state(params, opt_state) -> dict:
  """The train state of one entry that `train_step` takes: alive, not diverged."""
  return {"params": params, "opt_state": opt_state, "alive": jnp.asarray(True),
          "diverged_step": jnp.asarray(-1, jnp.int32)}


def init_state(task: Task, data: Data, seeds: Sequence[int], learning_rate, weight_decay,
               settings: Settings, placement: sharding_lib.Placement | None = None) -> Any:
  """Vmapped initial train state for every entry (placed by `placement`, e.g. entry axis over devices)."""
  entries = len(seeds)
  lr = jnp.broadcast_to(jnp.asarray(learning_rate, jnp.float32), (entries,))
  wd = jnp.broadcast_to(jnp.asarray(weight_decay, jnp.float32), (entries,))
  tx = make_optimizer(settings, total_steps(settings, data.num_train))

  def one_entry(key, lr, wd, frozen):
    params = task.init(jax.random.fold_in(key, 0), frozen)
    opt_state = tx.init(params)
    _hyperparams(opt_state).update(learning_rate=lr, weight_decay=wd,
                                 b1=jnp.asarray(settings.b1, jnp.float32),
                                 b2=jnp.asarray(settings.b2, jnp.float32))
    return entry_state(params, opt_state)

  frozen_axis = 0 if data.per_seed else None
  out = {} if placement is None else {"out_shardings": placement.entry_sharding()}
  args = (seed_keys(seeds), lr, wd, data.frozen)
  lowered = jax.jit(jax.vmap(one_entry, in_axes=(0, 0, 0, frozen_axis)), **out).lower(*args)
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
  return (np.broadcast_to(np.asarray(lr, np.float32), (entries,)),
          np.broadcast_to(np.asarray(wd, np.float32), (entries,)))


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
  shapes = jax.eval_shape(lambda p, f, t: _diagnostics(task, p, f, t, settings.eval_batch_size),
                          params, frozen, test)
  return {name: np.full((entries, settings.epochs, *leaf.shape), np.nan, np.float32)
          for name, leaf in shapes.items()}


def initial_fit_state(task: Task, data: Data, seeds: Sequence[int], settings: Settings, learning_rate=None,
                      weight_decay=None) -> FitState:
  """The FitState of epoch 0 on the default device (also the template a checkpoint is restored into)."""
  lr, wd = entry_hyperparams(settings, len(seeds), learning_rate, weight_decay)
  return FitState(init_state(task, data, seeds, lr, wd, settings), 0,
                  empty_history(task, data, len(seeds), settings),
                  empty_train_history(task, len(seeds), settings),
                  empty_diagnostics(task, data, len(seeds), settings),
                  np.full((len(seeds),), np.nan, np.float32))


def physical_memory_bytes() -> int | None:
  """RAM of this machine (None where the OS does not say)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def history_bytes(entries: int, settings: Settings, splits: int = 3, metrics_per_split: int = 4) -> int:
  """Host memory of one fit's histories (float64 evaluations, float32 training means), an upper bound."""
  return entries * settings.epochs * (splits * metrics_per_split * 8 + 8 * 4)


def check_memory(nbytes: float, what: str, fix: str) -> None:
  """A ValueError with the estimate when `nbytes` cannot fit in this machine's memory."""
  total = physical_memory_bytes()
  if total is not None and nbytes > 0.8 * total:
    raise ValueError(f"{what} needs about {nbytes / 2**30:,.1f} GiB, more than this machine can hold "
                     f"({total / 2**30:,.1f} GiB of RAM): {fix}.")


def _pad_entries(tree: Any, total: int) -> Any:
  """Repeats the last entry along axis 0 until every leaf has `total` entries (numpy or jax arrays)."""
  def pad(a):
    n = a.shape[0]
    if n == total:
      return a
    index = np.minimum(np.arange(total), n - 1)
    return a[index] if isinstance(a, jax.Array) else np.asarray(a)[index]
  return jax.tree_util.tree_map(pad, tree)


def _take_entries(tree: Any, n: int) -> Any:
  return jax.tree_util.tree_map(lambda a: a[:n], tree)


def _log_line(name, history, epoch, settings, splits, metric_names, elapsed) -> str:
  """One progress line: the mean (and for the last metric, the std) over entries of this epoch."""
  if tuple(metric_names) == METRICS and tuple(splits) == SPLITS:
    test_r2 = history[:, epoch, 1, 1]
    return (f"  [{name}] epoch {epoch + 1:>3}/{settings.epochs}  train mse {np.nanmean(history[:, epoch, 0, 0]):.4f}"
            f"  test mse {np.nanmean(history[:, epoch, 1, 0]):.4f}  test R2 {np.nanmean(test_r2):+.4f}"
            f" +- {np.nanstd(test_r2):.4f}  ({elapsed:.1f}s)")
  parts = [f"{split} {metric} {np.nanmean(history[:, epoch, k, m]):.4f}"
           for k, split in enumerate(splits) if split != "train" or k == 0
           for m, metric in enumerate(metric_names) if split != "train" or m == 0]
  return f"  [{name}] epoch {epoch + 1:>3}/{settings.epochs}  " + "  ".join(parts) + f"  ({elapsed:.1f}s)"


def _blowups(fit_state: FitState, entries: int, alive: np.ndarray) -> dict[int, str]:
  """Entries whose finite training objective blew up, {entry: status} (see the module docstring)."""
  out = {}
  loss = fit_state.train_history[:entries, :, 0]                                     # [entries, epochs]
  initial = fit_state.initial_loss
  final_metrics = fit_state.history[:entries, -1]
  for k in range(entries):
    if not alive[k]:
      continue
    ref = float(initial[k]) if initial is not None else float("nan")
    limit = BLOWUP_FACTOR * max(abs(ref), 1e-12)
    past = np.nonzero(loss[k] > limit)[0] if np.isfinite(ref) else np.zeros((0,), int)
    if len(past) and loss[k, -1] > ref:
      out[k] = (f"diverged at epoch {int(past[0]) + 1} (training loss grew from {ref:.3g} to "
                f"{float(loss[k, past[0]]):.3g}, ending at {float(loss[k, -1]):.3g})")
    elif not np.all(np.isfinite(final_metrics[k])):
      out[k] = f"diverged at epoch {loss.shape[1]} (non-finite final metrics)"
  return out


def fit(task: Task, data: Data, seeds: Sequence[int], settings: Settings, *, name: str = "model",
        learning_rate: Sequence[float] | float | None = None,
        weight_decay: Sequence[float] | float | None = None,
        checkpoints: "checkpoint_lib.Policy | None" = None,
        resume: FitState | None = None,
        on_epoch_end: Callable[[FitState], None] | None = None,
        log: Callable[[str], None] | None = print,
        placement: sharding_lib.Placement | None = None) -> FitResult:
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
  Returns the history of all entries.
  """
  start = time.perf_counter()
  seeds = list(seeds)
  entries = len(seeds)
  settings.check_batch(data.num_train)
  if placement is not None:
    placement.check_batch(settings.batch_size)
  ckpt = None
  if checkpoints is not None and checkpoints.directory is not None:
    ckpt = checkpoint_lib.Checkpointer.open(checkpoints, settings.epochs, name=name, log=log)
  if resume is None and ckpt is not None:
    unplaced = data
    resume = ckpt.restore(lambda: initial_fit_state(task, unplaced, seeds, settings, learning_rate, weight_decay))
    if resume is not None and log:
      log(f"  [{name}] resuming from the checkpoint at epoch {resume.epoch}/{settings.epochs}")
  lr, wd = entry_hyperparams(settings, entries, learning_rate, weight_decay)
  splits = data.splits
  total = entries if placement is None else placement.padded(entries)
  padded_seeds = seeds + [seeds[-1]] * (total - entries)
  if placement is not None:
    data = placement.place_data(data if total == entries or not data.per_seed else dataclasses.replace(
        data, train=_pad_entries(dict(data.train), total), test=_pad_entries(dict(data.test), total),
        val=None if data.val is None else _pad_entries(dict(data.val), total),
        frozen=_pad_entries(data.frozen, total)))
  epoch_fn, steps = _build_epoch_fn(task, settings, data.num_train, data.per_seed, placement)
  keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(seed_keys(padded_seeds))
  if placement is not None:
    keys = jax.device_put(keys, placement.entry_sharding())
  if resume is None:
    fit_state = FitState(init_state(task, data, padded_seeds, _pad_entries(lr, total), _pad_entries(wd, total),
                                    settings, placement), 0, empty_history(task, data, entries, settings))
  else:
    state = resume.state
    if placement is not None:
      state = jax.device_put(_pad_entries(state, total), placement.entry_sharding())
    fit_state = dataclasses.replace(resume, state=state)
  if fit_state.train_history is None:
    fit_state.train_history = empty_train_history(task, entries, settings)
  if fit_state.diagnostics is None:
    fit_state.diagnostics = {}
  if fit_state.initial_loss is None:
    fit_state.initial_loss = np.full((entries,), np.nan, np.float32)
  log_every = settings.log_every or max(1, settings.epochs // 5)
  unpadded = (lambda fs: fs) if total == entries else (
      lambda fs: dataclasses.replace(fs, state=_take_entries(fs.state, entries)))
  every = checkpoints.every_epochs if checkpoints is not None else 0

  while fit_state.epoch < settings.epochs:
    epoch0 = fit_state.epoch
    epoch = epoch0 + settings.eval_every - 1                                         # the evaluated epoch
    state, (evals, train_means, first, diagnostics) = epoch_fn(
        fit_state.state, keys, epoch0, data.frozen, data.train, data.test, data.val)
    history = fit_state.history.copy()
    history[:, epoch] = np.asarray(evals)[:entries]
    train_history = fit_state.train_history.copy()
    train_history[:, epoch0:epoch + 1] = np.asarray(train_means)[:entries]
    initial_loss = fit_state.initial_loss if epoch0 else np.asarray(first, np.float32)[:entries]
    recorded = {}
    for key, value in diagnostics.items():
      value = np.asarray(value, np.float32)[:entries]                               # [entries, ...]
      recorded[key] = fit_state.diagnostics.get(key)
      if recorded[key] is None:
        recorded[key] = np.full((entries, settings.epochs, *value.shape[1:]), np.nan, np.float32)
      recorded[key] = recorded[key].copy()
      recorded[key][:, epoch] = value
    fit_state = FitState(state, epoch + 1, history, train_history, recorded, initial_loss)
    if log and ((epoch + 1) // log_every > epoch0 // log_every or epoch + 1 == settings.epochs or epoch0 == 0):
      log(_log_line(name, history, epoch, settings, splits, task.metric_names, time.perf_counter() - start))
    if on_epoch_end is not None:
      on_epoch_end(unpadded(fit_state))
    last = fit_state.epoch == settings.epochs
    stop = checkpoint_lib.stop_requested() and not last
    saved = False
    if ckpt is not None and (last or stop or (every and (epoch + 1) // every > epoch0 // every)):
      saved = ckpt.save(unpadded(fit_state))
    if stop:
      where = (f"checkpoint saved at epoch {fit_state.epoch} in {ckpt.directory}" if saved else
               f"stopped at epoch {fit_state.epoch}, nothing saved" + (" (the checkpoint save failed)" if ckpt
                                                                      else " (no checkpoint directory)"))
      raise checkpoint_lib.Preempted(f"[{name}] {where}")

  diverged_step = np.asarray(fit_state.state["diverged_step"])[:entries]
  blowups = _blowups(fit_state, entries, diverged_step < 0)
  status = []
  for k, (seed, step) in enumerate(zip(seeds, diverged_step)):
    if k in blowups:
      status.append(blowups[k])
      if log:
        log(f"  [{name}] seed {seed}: {blowups[k]}; flagged as diverged, the others carried on.")
      continue
    if step < 0:
      status.append("ok")
      continue
    epoch = int(step) // steps + 1
    status.append(f"diverged at epoch {epoch}")
    if log:
      log(f"  [{name}] seed {seed}: non-finite loss at epoch {epoch}, step {int(step) % steps + 1} of {steps}; "
          "this entry stopped there, the others carried on.")
  params = fit_state.state["params"] if total == entries else _take_entries(fit_state.state["params"], entries)
  return FitResult(params=params, history=fit_state.history, status=status,
                   diverged_step=diverged_step, wall_time_s=time.perf_counter() - start,
                   splits=splits, metric_names=tuple(task.metric_names),
                   train_history=fit_state.train_history, train_names=task.train_names,
                   diagnostics=fit_state.diagnostics)
