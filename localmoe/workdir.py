"""Workdir safety: a finished run is never silently overwritten, and two processes never share a workdir.

  with workdir.guard(path, overwrite=False):
      run(config, path)

- A workdir holding results.json is a finished run: refused unless overwrite=True (then the previous results,
  history, TensorBoard events and checkpoints are removed first).
- A lock file (.lock, holding host and pid) refuses a second process; a lock left by a dead process on this
  host is detected, reported and cleared.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket

RESULT_FILES = ("results.json", "results.md", "history.csv", "sweep.json", "sweep.md")
RESULT_DIRS = ("tb", "checkpoints", "figures")
LOCK = ".lock"


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked; the message says why and what to do."""


def is_finished(path: str) -> bool:
  return os.path.exists(os.path.join(path, "results.json"))


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def acquire_lock(path: str) -> str:
  """Creates <path>/.lock atomically; clears a stale lock of a dead process on this host."""
  lock = os.path.join(path, LOCK)
  me = {"host": socket.gethostname(), "pid": os.getpid()}
  for _ in range(2):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(lock) as f:
          owner = json.load(f)
      except (OSError, ValueError):
        owner = {}
      same_host = owner.get("host") == me["host"]
      pid = int(owner.get("pid", -1))
      if same_host and pid > 0 and _pid_alive(pid):
        raise WorkdirError(f"workdir {path} is in use by process {pid} on this host (lock file {lock}). "
                           "Wait for it to finish, or use another --workdir.") from None
      if not same_host and owner:
        raise WorkdirError(f"workdir {path} is locked by process {pid} on host {owner.get('host')!r}. If that "
                           f"process is gone, delete {lock} and re-run.") from None
      print(f"[workdir] clearing a stale lock left by dead process {pid} ({lock})", flush=True)
      os.remove(lock)
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return lock
  raise WorkdirError(f"could not acquire {lock}")


def clear_results(path: str) -> None:
  for name in RESULT_FILES:
    target = os.path.join(path, name)
    if os.path.exists(target):
      os.remove(target)
  for name in RESULT_DIRS:
    shutil.rmtree(os.path.join(path, name), ignore_errors=True)


@contextlib.contextmanager
def guard(path: str, overwrite: bool = False):
  """Checks and locks `path` for one run; releases the lock on exit (also on errors)."""
  if is_finished(path) and not overwrite:
    raise WorkdirError(f"workdir {path} already holds a finished run: see {os.path.join(path, 'results.md')} "
                       "and results.json. Pass --overwrite to replace it, or choose another --workdir.")
  os.makedirs(path, exist_ok=True)
  lock = acquire_lock(path)
  try:
    if overwrite and is_finished(path):
      print(f"[workdir] --overwrite: removing the previous results in {path}", flush=True)
      clear_results(path)
    yield path
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(lock)
