"""The trainer's state between evaluations (`FitState`) and the outcome of one fit (`FitResult`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from localmoe.train.task import METRICS, SPLITS, Params


@dataclasses.dataclass
class FitState:
  """Everything needed to continue training: the vmapped train state and the history so far."""

  state: Any  # pytree with leading entry axis: params, opt_state, alive, diverged_step
  epoch: int  # epochs completed
  history: np.ndarray  # [entries, epochs, splits, metrics], NaN where not yet run
  train_history: np.ndarray | None = None  # [entries, epochs, len(task.train_names)] epoch means
  diagnostics: dict[str, np.ndarray] | None = None  # name -> [entries, epochs, ...] (Task.diagnostics)
  initial_loss: np.ndarray | None = None  # [entries] objective of the first step (the blow-up reference)


@dataclasses.dataclass
class FitResult:
  """Outcome of `fit` for one method: final params and per-epoch history of every entry."""

  params: Params  # leading entry axis
  history: np.ndarray  # [entries, epochs, len(splits), len(metric_names)]
  status: list[str]  # "ok" or "diverged at epoch E" per entry
  diverged_step: np.ndarray  # [entries] global step of the first non-finite loss, -1 if none
  wall_time_s: float
  splits: tuple[str, ...] = SPLITS  # axis 2 of history (Data.splits)
  metric_names: tuple[str, ...] = METRICS  # axis 3 of history (Task.metric_names)
  train_history: np.ndarray | None = None  # [entries, epochs, len(train_names)]: loss and aux, epoch means
  train_names: tuple[str, ...] = ("loss",)  # axis 2 of train_history (Task.train_names)
  diagnostics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # [entries, epochs, ...]
  initial_diagnostics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # [entries, ...]: at init

  def _index(self, split: str, metric: str) -> tuple[int, int]:
    if split not in self.splits or metric not in self.metric_names:
      raise KeyError(
        f"history has splits {self.splits} and metrics {self.metric_names}; asked for ({split!r}, {metric!r})."
      )
    return self.splits.index(split), self.metric_names.index(metric)

  def final(self, split: str, metric: str) -> np.ndarray:
    """Last-epoch value per entry: [entries]."""
    return self.history[:, -1, *self._index(split, metric)]

  def curve(self, split: str, metric: str) -> np.ndarray:
    """Per-epoch values: [entries, epochs]."""
    return self.history[:, :, *self._index(split, metric)]

  def entry(self, k: int) -> "FitResult":
    """Entry k alone (leading axes of size 1), e.g. to write one sweep entry's files."""
    take = lambda a: a[k : k + 1]
    return dataclasses.replace(
      self,
      params=jax.tree_util.tree_map(take, self.params),
      history=take(self.history),
      status=[self.status[k]],
      diverged_step=take(self.diverged_step),
      train_history=None if self.train_history is None else take(self.train_history),
      diagnostics={n: take(v) for n, v in self.diagnostics.items()},
      initial_diagnostics={n: take(v) for n, v in self.initial_diagnostics.items()},
    )
