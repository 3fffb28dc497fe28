"""Checkpoints, resume and preemption for `train.fit` (orbax-checkpoint).

Each trained method (or sweep group) gets its own orbax `CheckpointManager` under
<workdir>/checkpoints/<name>. It saves the whole `train.FitState` (vmapped params, optimiser state,
divergence flags, epoch, history so far) every `every_epochs` epochs and at the end. Shuffling keys are
derived from (seed, epoch), so a resumed run replays exactly the batches the uninterrupted run would have
seen: results are bit-identical on CPU.

Preemption: inside `preemption_guard()`, SIGTERM/SIGINT only set a flag; the next epoch boundary of every
running fit saves a checkpoint and raises `Preempted` (a BaseException, so per-method error handling does
not swallow it). `launch.py` turns it into a clean exit with a message saying how to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from typing import Callable

import numpy as np
import orbax.checkpoint as ocp

from localmoe import train

EXIT_PREEMPTED = 75          # EX_TEMPFAIL: "try again"; schedulers can requeue on it


class Preempted(BaseException):
  """Raised at an epoch boundary after SIGTERM/SIGINT, once the checkpoint is saved."""


_STOP = threading.Event()
_SIGNAL_NAME: list[str] = []


def stop_requested() -> bool:
  return _STOP.is_set()


def request_stop(name: str = "request") -> None:
  """What the signal handler does; also callable from tests or a notebook."""
  _SIGNAL_NAME.append(name)
  _STOP.set()


@contextlib.contextmanager
def preemption_guard(signals=(signal.SIGTERM, signal.SIGINT)):
  """Installs handlers that turn SIGTERM/SIGINT into a checkpoint-and-stop at the next epoch boundary.

  A second signal while stopping falls back to the default behaviour (immediate interrupt).
  """
  _STOP.clear()
  _SIGNAL_NAME.clear()
  previous = {}

  def handler(signum, frame):
    del frame
    if _STOP.is_set():                      # second signal: give up waiting
      signal.signal(signum, previous.get(signum, signal.SIG_DFL))
      raise KeyboardInterrupt
    print(f"\n[preemption] {signal.Signals(signum).name} received: saving checkpoints at the end of the "
          "current epoch, then exiting.", flush=True)
    request_stop(signal.Signals(signum).name)

  if threading.current_thread() is threading.main_thread():
    for sig in signals:
      previous[sig] = signal.signal(sig, handler)
  try:
    yield
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


@dataclasses.dataclass
class Checkpointer:
  """Saves and restores one fit's `FitState` under `directory` (one orbax step per saved epoch)."""
  directory: str
  every_epochs: int = 10           # 0: only at the end (and on preemption)
  total_epochs: int = 0

  def __post_init__(self):
    if self.every_epochs < 0:
      raise ValueError(f"config.checkpoint_every_epochs={self.every_epochs} must be >= 0 (0: only at the end).")
    self.directory = os.path.abspath(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True))

  def latest_epoch(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, template: train.FitState) -> train.FitState | None:
    """The latest saved FitState (shaped like `template`), or None if nothing was saved."""
    step = self._manager.latest_step()
    if step is None:
      return None
    target = _payload(template)
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    return train.FitState(state=restored["state"], epoch=int(restored["epoch"]),
                          history=np.asarray(restored["history"]),
                          train_history=np.asarray(restored["train_history"]),
                          diagnostics={k: np.asarray(v) for k, v in restored.get("diagnostics", {}).items()})

  def save(self, fit_state: train.FitState) -> None:
    payload = _payload(fit_state)
    self._manager.save(fit_state.epoch, args=ocp.args.StandardSave(payload), force=True)
    self._manager.wait_until_finished()

  def on_epoch_end(self, fit_state: train.FitState) -> None:
    """Hook for `train.fit`: periodic saves, the final save, and checkpoint-then-stop on preemption."""
    last = fit_state.epoch == self.total_epochs
    periodic = self.every_epochs and fit_state.epoch % self.every_epochs == 0
    if last or periodic or stop_requested():
      self.save(fit_state)
    if stop_requested() and not last:
      raise Preempted(f"checkpoint saved at epoch {fit_state.epoch} in {self.directory}")


def _payload(fit_state: train.FitState) -> dict:
  """What a checkpoint holds: the train state, the histories so far and the epoch."""
  payload = {"state": fit_state.state, "history": fit_state.history, "train_history": fit_state.train_history,
             "epoch": np.asarray(fit_state.epoch)}
  if fit_state.diagnostics:
    payload["diagnostics"] = dict(fit_state.diagnostics)
  return payload


def fit_with_checkpoints(task: train.Task, data: train.Data, seeds, settings: train.Settings, *,
                         directory: str | None, every_epochs: int = 10, name: str = "model",
                         log: Callable[[str], None] | None = print, **fit_kwargs) -> train.FitResult:
  """`train.fit` that resumes from `directory` when a checkpoint exists and saves as it goes.

  directory=None: plain `train.fit` (no files), still stopping cleanly on preemption.
  """
  if directory is None:
    def stop_if_asked(fit_state: train.FitState) -> None:
      if stop_requested() and fit_state.epoch < settings.epochs:
        raise Preempted(f"stopped at epoch {fit_state.epoch} (no checkpoint directory: nothing saved)")
    return train.fit(task, data, seeds, settings, name=name, log=log, on_epoch_end=stop_if_asked, **fit_kwargs)
  ckpt = Checkpointer(directory, every_epochs, settings.epochs)
  resume = None
  if ckpt.latest_epoch() is not None:
    template = train.initial_fit_state(task, data, seeds, settings, fit_kwargs.get("learning_rate"),
                                       fit_kwargs.get("weight_decay"))
    resume = ckpt.restore(template)
    if log:
      log(f"  [{name}] resuming from the checkpoint at epoch {resume.epoch}/{settings.epochs}")
  return train.fit(task, data, seeds, settings, name=name, log=log, resume=resume,
                   on_epoch_end=ckpt.on_epoch_end, **fit_kwargs)
