"""What a fit trains (`Task`) and on what (`Data`).

Regression is the default (squared-error loss; MSE and R^2 per split). A Task may instead bring its own
per-example loss and metrics (e.g. cross-entropy and accuracy for classification), and Data may carry a
validation split ("train", "val", "test"); FitResult.splits / .metric_names then say what the history holds.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Params = Any
Batch = Mapping[str, jax.Array]

SPLITS = ("train", "test")
METRICS = ("mse", "r2")


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
  rngs: names of the flax rng streams `predict` uses in training (e.g. ("gumbel", "dropout") for Gumbel
    routing and expert dropout). When non-empty, the training step calls
    `predict(params, frozen, inputs, rngs={name: key})` with keys drawn per step and per entry:
    fold_in(fold_in(seed key, 2), global step), then fold_in(., i) for the i-th name, so a resumed run draws
    the same keys. Evaluation and diagnostics call `predict` without rngs (deterministic). () (default):
    `predict` is called as before, with three arguments.
  takes_step: when True, `predict` also gets `step=` the global optimiser step (an int32 scalar): the
    step being taken in training, the steps taken so far in evaluation (e.g. for an annealed router
    temperature, `routing.temperature_at`).
  """

  init: Callable[[jax.Array, Any], Params]
  predict: Callable[[Params, Any, Batch], Any]
  loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  metric_names: tuple[str, ...] = ("mse", "r2")
  per_example_metrics: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  aux_names: tuple[str, ...] = ()
  diagnostics: Callable[[Params, Any, Batch], Mapping[str, jax.Array]] | None = None
  rngs: tuple[str, ...] = ()
  takes_step: bool = False

  def __post_init__(self):
    if (
      isinstance(self.rngs, str)
      or not all(isinstance(n, str) and n for n in self.rngs)
      or len(set(self.rngs)) != len(tuple(self.rngs))
    ):
      raise TypeError(
        f"Task.rngs={self.rngs!r} must be a tuple of distinct rng stream names, e.g. "
        "('gumbel', 'dropout'), or () for none."
      )
    object.__setattr__(self, "rngs", tuple(self.rngs))
    if not isinstance(self.takes_step, bool):
      raise TypeError(f"Task.takes_step={self.takes_step!r} must be True or False.")
    for wanted, needed in (("rngs", bool(self.rngs)), ("step", self.takes_step)):
      if needed and not _accepts_keyword(self.predict, wanted):
        field = f"Task.rngs={self.rngs!r}" if wanted == "rngs" else "Task.takes_step=True"
        raise TypeError(
          f"{field} but Task.predict takes no '{wanted}' keyword: define predict(params, frozen, "
          f"inputs, {wanted}=None), or leave {field.split('=')[0]} at its default."
        )
    if self.per_example_metrics is None and tuple(self.metric_names) != METRICS:
      raise ValueError(
        f"Task.metric_names={self.metric_names!r} needs Task.per_example_metrics (a function "
        f"(pred, y) -> [batch, {len(self.metric_names)}]); without it the metrics are {METRICS}."
      )
    if "loss" in self.aux_names:
      raise ValueError(
        "Task.aux_names may not contain 'loss': the trainer records the training loss itself "
        "as train_history[..., 0]; name the aux output differently."
      )

  @property
  def train_names(self) -> tuple[str, ...]:
    """Columns of FitResult.train_history: the training objective, then every aux output."""
    return ("loss", *self.aux_names)

  def call(self, params, frozen, inputs: Batch, key: jax.Array | None = None, step=None):
    """`predict` with what the task declares: rngs drawn from `key` (training only; None: no rngs) and the
    global `step` (when `takes_step`)."""
    kwargs = {}
    if self.rngs and key is not None:
      kwargs["rngs"] = {name: jax.random.fold_in(key, i) for i, name in enumerate(self.rngs)}
    if self.takes_step:
      kwargs["step"] = jnp.asarray(0 if step is None else step, jnp.int32)
    return self.predict(params, frozen, inputs, **kwargs)

  def predictions(self, params, frozen, inputs: Batch, step=None) -> jax.Array:
    """`predict` without its aux outputs and without rngs (what evaluation uses)."""
    out = self.call(params, frozen, inputs, None, step)
    return out[0] if self.aux_names else out


def _accepts_keyword(fn, name: str) -> bool:
  """Whether fn can be called with the keyword `name` (True when its signature cannot be read)."""
  try:
    parameters = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.kind == p.VAR_KEYWORD or (p.name == name and p.kind != p.POSITIONAL_ONLY) for p in parameters)


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
  val: Mapping[str, Any] | None = None  # optional validation split, evaluated every epoch like test

  @property
  def splits(self) -> tuple[str, ...]:
    """Names of the evaluated splits, in history order."""
    return SPLITS if self.val is None else ("train", "val", "test")

  @property
  def num_train(self) -> int:
    y = self.train["y"]
    return int(y.shape[1] if self.per_seed else y.shape[0])
