"""Checkpoints, resume and preemption for the one fit loop, `train.fit` (orbax-checkpoint).

  fit = train.fit(task, data, seeds, settings, checkpoints=checkpoint.Policy(directory, every_epochs=10,
                                                                              config=config.to_dict()))

A `Policy` passed to `train.fit` gives that fit its own orbax `CheckpointManager` under `directory` (one per
method, variant or sweep group). It saves the whole `train.FitState` (vmapped params, optimiser state,
divergence flags, epoch, histories so far) every `every_epochs` epochs (rounded up to an evaluation) and at
the end, and keeps the two latest steps. Shuffling keys are derived from (seed, epoch), so a resumed run
replays exactly the batches the uninterrupted run would have seen: results are bit-identical on CPU.

A checkpoint belongs to the config that made it: the policy's `config` is stored next to it (config.json)
and a resume under another config is refused (`workdir.ConfigMismatchError`, listing the differing fields).
A checkpoint that cannot be read is reported with its path and removed; the fit falls back to the previous
step, or retrains from epoch 0 when none is left (the log line says which). A save that fails, or a
directory that cannot be created, is a warning: training goes on without that checkpoint.

Preemption: inside `preemption_guard()`, SIGTERM/SIGINT only set a flag; at the next evaluation every
running fit saves a checkpoint (if it has a directory) and raises `Preempted` (a BaseException, so
per-method error handling does not swallow it). `launch.py` turns it into exit status 75 and a message
saying how to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from localmoe import workdir as workdir_lib

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; schedulers can requeue on it
CONFIG_FILE = "config.json"  # the config a checkpoint directory belongs to


class Preempted(BaseException):
  """Raised at an evaluation boundary after SIGTERM/SIGINT, once the checkpoint is saved."""


_STOP = threading.Event()
_SIGNAL_NAME: list[str] = []


def stop_requested() -> bool:
  return _STOP.is_set()


def request_stop(name: str = "request") -> None:
  """What the signal handler does; also callable from tests or a notebook."""
  _SIGNAL_NAME.append(name)
  _STOP.set()


def clear_stop() -> None:
  _STOP.clear()
  _SIGNAL_NAME.clear()


@contextlib.contextmanager
def preemption_guard(signals=(signal.SIGTERM, signal.SIGINT)):
  """Installs handlers that turn SIGTERM/SIGINT into a checkpoint-and-stop at the next evaluation.

  A second signal while stopping falls back to the default behaviour (immediate interrupt).
  """
  clear_stop()
  previous = {}

  def handler(signum, frame):
    del frame
    if _STOP.is_set():  # second signal: give up waiting
      signal.signal(signum, previous.get(signum, signal.SIG_DFL))
      raise KeyboardInterrupt
    print(
      f"\n[preemption] {signal.Signals(signum).name} received: saving checkpoints at the next "
      "evaluation, then exiting.",
      flush=True,
    )
    request_stop(signal.Signals(signum).name)

  if threading.current_thread() is threading.main_thread():
    for sig in signals:
      previous[sig] = signal.signal(sig, handler)
  try:
    yield
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


@dataclasses.dataclass(frozen=True)
class Policy:
  """How `train.fit` checkpoints one fit."""

  directory: str | None  # None: no files (a stop request still ends the fit cleanly)
  every_epochs: int = 10  # DEFAULT_EVERY_EPOCHS; 0: only at the end (and on preemption)
  config: Mapping[str, Any] | None = None  # the resolved config of the run: stored, compared on resume

  def __post_init__(self):
    _check_every(self.every_epochs)

  def child(self, name: str) -> "Policy":
    """The same policy for a sub-directory (one per method or variant)."""
    return dataclasses.replace(self, directory=None if self.directory is None else os.path.join(self.directory, name))


DEFAULT_EVERY_EPOCHS = 10  # config.checkpoint_every_epochs when a config does not set it


def _check_every(every) -> int:
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 0:
    raise ValueError(
      f"config.checkpoint_every_epochs={every!r} must be >= 0, an integer (0: checkpoint only at the end)."
    )
  return int(every)


def every_epochs(config) -> int:
  """config.checkpoint_every_epochs (DEFAULT_EVERY_EPOCHS when absent), validated: the one place it is read."""
  return _check_every(config.get("checkpoint_every_epochs", DEFAULT_EVERY_EPOCHS))


def policy(config, workdir: str | None, *parts: str) -> Policy:
  """The Policy of one run: <workdir>/checkpoints/<parts...>, every config.checkpoint_every_epochs, tied to
  `config` (workdir None: no files)."""
  directory = None if workdir is None else os.path.join(workdir, "checkpoints", *parts)
  return Policy(directory, every_epochs(config), config=config)


class Checkpointer:
  """Saves and restores one fit's `FitState` under `directory` (one orbax step per saved epoch)."""

  def __init__(
    self,
    directory: str,
    every_epochs: int = 10,
    total_epochs: int = 0,
    config: Mapping[str, Any] | None = None,
    name: str = "model",
    log: Callable[[str], None] | None = print,
  ):
    _check_every(every_epochs)
    self.directory = os.path.abspath(directory)
    self.every_epochs, self.total_epochs, self.name = every_epochs, total_epochs, name
    self.config = None if config is None else workdir_lib.comparable(config)
    self._log = log or (lambda line: None)
    self._config_written = False
    os.makedirs(self.directory, exist_ok=True)
    options = {}
    if jax.process_count() > 1:  # each process checkpoints its own fits (its slice of a sweep) alone
      me = jax.process_index()
      options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process{me}"
      )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=False, **options),
    )

  @classmethod
  def open(
    cls, policy: Policy, total_epochs: int, name: str = "model", log: Callable[[str], None] | None = print
  ) -> "Checkpointer | None":
    """A Checkpointer for `policy`, or None (with a warning) when its directory cannot be used."""
    try:
      return cls(policy.directory, policy.every_epochs, total_epochs, policy.config, name, log)
    except OSError as error:
      if log:
        log(
          f"  [{name}] WARNING: cannot use checkpoint directory {policy.directory} ({type(error).__name__}: "
          f"{error}); training on without checkpoints (a preemption will lose this fit's progress)."
        )
      return None

  def latest_epoch(self) -> int | None:
    return self._manager.latest_step()

  def _check_config(self) -> None:
    path = os.path.join(self.directory, CONFIG_FILE)
    if self.config is None or not os.path.exists(path):
      return
    try:
      with open(path) as f:
        stored = json.load(f)
    except (OSError, ValueError) as error:
      self._log(f"  [{self.name}] WARNING: {path} is unreadable ({error}); its checkpoints are not trusted.")
      stored = {"unreadable": True}
    workdir_lib.check_same_config(stored, self.config, f"the checkpoints in {self.directory}")

  def restore(self, template: Callable[[], Any]) -> Any | None:
    """The latest readable FitState (shaped like `template()`), or None if there is none.

    An unreadable step is reported with its path and removed; the previous step is tried next.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    self._check_config()
    like = template()
    for k, step in enumerate(steps):
      try:
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(_payload(like)))
      except Exception as error:  # a torn or corrupt step: fall back, never crash the run
        path = os.path.join(self.directory, str(step))
        fallback = (
          f"falling back to the checkpoint at epoch {steps[k + 1]}"
          if k + 1 < len(steps)
          else "retraining this fit from epoch 0"
        )
        self._log(
          f"  [{self.name}] WARNING: checkpoint {path} is unreadable ({type(error).__name__}: "
          f"{str(error)[:200]}); removed it, {fallback}."
        )
        shutil.rmtree(path, ignore_errors=True)
        self._manager.reload()
        continue
      return dataclasses.replace(
        like,
        state=restored["state"],
        epoch=int(restored["epoch"]),
        history=np.asarray(restored["history"]),
        train_history=np.asarray(restored["train_history"]),
        diagnostics={k: np.asarray(v) for k, v in restored.get("diagnostics", {}).items()},
        initial_loss=np.asarray(restored["initial_loss"]),
      )
    return None

  def save(self, fit_state) -> bool:
    """Saves `fit_state` at its epoch; a failure is a warning (returns False), never the end of training."""
    try:
      if self.config is not None and not self._config_written:
        workdir_lib.write_config(self.directory, self.config)
        self._config_written = True
      self._manager.save(fit_state.epoch, args=ocp.args.StandardSave(_payload(fit_state)), force=True)
      self._manager.wait_until_finished()
      return True
    except Exception as error:  # disk full, permissions, a vanished directory: keep training
      self._log(
        f"  [{self.name}] WARNING: saving the checkpoint at epoch {fit_state.epoch} in {self.directory} "
        f"failed ({type(error).__name__}: {str(error)[:200]}); training goes on."
      )
      return False


def _payload(fit_state) -> dict:
  """What a checkpoint holds: the train state, the histories so far, the epoch and the initial loss."""
  payload = {
    "state": fit_state.state,
    "history": fit_state.history,
    "train_history": fit_state.train_history,
    "epoch": np.asarray(fit_state.epoch),
    "initial_loss": np.asarray(fit_state.initial_loss),
  }
  if fit_state.diagnostics:
    payload["diagnostics"] = dict(fit_state.diagnostics)
  return payload
