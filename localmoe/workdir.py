"""Workdir safety: a finished run is never silently overwritten, a workdir belongs to one config, and two
processes never share a workdir.

  with workdir.guard(path, overwrite=False, config=config):
      run(config, path)

- The path must be a directory this process can write (or one it can create): a file, a path under a file,
  an empty path or a read-only directory is one clear error.
- A workdir holding results.json is a finished run: refused unless overwrite=True (then the previous results,
  history, TensorBoard events, checkpoints and config.json are removed first; also for an unfinished run).
- config.json, the resolved config, is written at the start of every run. An unfinished workdir (holding
  checkpoints) whose config.json differs from the new config is refused before any compute, listing the
  differing fields (`ConfigMismatchError`); `checkpoint.Checkpointer` applies the same rule per checkpoint
  directory and `localmoe.sweep` per finished entry. Fields in RUN_ONLY (how often to log or checkpoint) may
  change between a run and its resume.
- A lock file (.lock, holding host and pid) refuses a second process; a lock left by a dead process on this
  host is detected, reported and cleared; an empty or garbled lock is reported with its path.
- Temp files of an atomic write killed half-way (.tmp-*) are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from typing import Any, Mapping

from localmoe import atomic

RESULT_FILES = ("results.json", "results.md", "history.csv", "sweep.json", "sweep.md", "config.json")
RESULT_DIRS = ("tb", "checkpoints", "figures", "entries")
LOCK = ".lock"
CONFIG_FILE = "config.json"
RUN_ONLY = ("checkpoint_every_epochs", "optim.log_every")  # may differ between a run and its resume
TMP_PREFIX = atomic.TMP_PREFIX
current_umask = atomic.current_umask


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked; the message says why and what to do."""


class ConfigMismatchError(WorkdirError):
  """Checkpoints or finished results in the workdir were made under another config."""


# ------------------------------------------------------------------------------------------- configs


def _json_safe(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if hasattr(value, "item") and callable(value.item):  # numpy scalars
    return value.item()
  return value


def comparable(config: Any) -> dict:
  """The config as plain JSON data, without the RUN_ONLY fields: what two runs must agree on."""
  data = json.loads(json.dumps(_json_safe(config), sort_keys=True, default=str))
  for dotted in RUN_ONLY:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
      node = node.get(part, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
      node.pop(leaf, None)
  return data


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(data, dict) and data:
    out = {}
    for key, value in data.items():
      out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out
  return {prefix or "(config)": data}


def config_diff(stored: Any, current: Any) -> list[str]:
  """'field: stored -> current' for every field that differs (RUN_ONLY fields ignored)."""
  a, b = _flatten(comparable(stored)), _flatten(comparable(current))
  return [
    f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
    for k in sorted(set(a) | set(b))
    if a.get(k, "(absent)") != b.get(k, "(absent)")
  ]


def check_same_config(stored: Any, current: Any, what: str) -> None:
  """Raises ConfigMismatchError (one line: the differing fields and the two ways out) if they differ."""
  diff = config_diff(stored, current)
  if diff:
    shown = "; ".join(diff[:8]) + (f"; ... ({len(diff) - 8} more)" if len(diff) > 8 else "")
    raise ConfigMismatchError(
      f"{what} were made under another config ({shown}). Resuming would mix the two: pass --overwrite to "
      "discard them and start over, or choose another --workdir."
    )


def write_config(path: str, config: Any) -> None:
  """<path>/config.json, atomically (readable by the group, like every results file)."""
  atomic.write_json(
    os.path.join(path, CONFIG_FILE), comparable(config) if not isinstance(config, dict) else config, sort_keys=True
  )


def read_config(path: str) -> dict | None:
  """<path>/config.json, or None if there is none; a garbled one is an error naming the file."""
  target = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(target):
    return None
  try:
    with open(target) as f:
      return json.load(f)
  except (OSError, ValueError) as error:
    raise WorkdirError(
      f"{target} is unreadable ({error}): it says which config this workdir's checkpoints "
      "belong to. Pass --overwrite to start over, or choose another --workdir."
    ) from None


# ------------------------------------------------------------------------------------------- the workdir


def is_finished(path: str) -> bool:
  return os.path.exists(os.path.join(path, "results.json"))


def check_path(path: str) -> None:
  """A one-line WorkdirError unless `path` is (or can become) a directory this process may write."""
  if not path or not str(path).strip():
    raise WorkdirError("--workdir is empty: name a directory for the results, e.g. --workdir=runs/svd.")
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {path} is a file, not a directory: choose another --workdir.")
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(f"workdir {path} lies under {parent}, which is a file: choose another --workdir.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(
      f"workdir {path} is not writable ({parent} does not allow this user to write): fix "
      "its permissions or choose another --workdir."
    )


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read_lock(lock: str) -> dict | None:
  """The lock's owner, or None if the file is empty or garbled (after a short wait for a writer)."""
  for attempt in range(3):
    try:
      with open(lock) as f:
        owner = json.load(f)
      if isinstance(owner, dict) and "pid" in owner and "host" in owner:
        return owner
    except FileNotFoundError:
      return {}
    except (OSError, ValueError):
      pass
    if attempt < 2:
      time.sleep(0.2)  # another process may be between creating and writing it
  return None


def acquire_lock(path: str) -> str:
  """Creates <path>/.lock atomically; clears a stale lock of a dead process on this host."""
  lock = os.path.join(path, LOCK)
  me = {"host": socket.gethostname(), "pid": os.getpid()}
  for _ in range(2):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      owner = _read_lock(lock)
      if owner is None:
        raise WorkdirError(
          f"lock file {lock} is empty or garbled, so it is unknown whether another run uses "
          f"workdir {path}. If none does, delete {lock} and re-run."
        ) from None
      if not owner:  # it vanished meanwhile
        continue
      same_host = owner.get("host") == me["host"]
      try:
        pid = int(owner.get("pid", -1))
      except (TypeError, ValueError):
        pid = -1
      if same_host and pid > 0 and _pid_alive(pid):
        raise WorkdirError(
          f"workdir {path} is in use by process {pid} on this host (lock file {lock}). "
          "Wait for it to finish, or use another --workdir."
        ) from None
      if not same_host:
        raise WorkdirError(
          f"workdir {path} is locked by process {pid} on host {owner.get('host')!r}. If that "
          f"process is gone, delete {lock} and re-run."
        ) from None
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


def remove_temp_files(path: str) -> None:
  """Removes .tmp-* files that an atomic write killed half-way left in `path` (not recursive)."""
  with contextlib.suppress(OSError):
    for name in os.listdir(path):
      if name.startswith(TMP_PREFIX):
        with contextlib.suppress(OSError):
          os.remove(os.path.join(path, name))


def has_state(path: str) -> bool:
  """Does `path` hold work a resume would reuse (checkpoints, or a sweep's entries)?"""
  return any(os.path.isdir(os.path.join(path, name)) for name in ("checkpoints", "entries"))


@contextlib.contextmanager
def guard(path: str, overwrite: bool = False, config: Any = None):
  """Checks and locks `path` for one run; releases the lock on exit (also on errors).

  config: the run's resolved config; compared with the config.json of an unfinished run (refused if they
  differ), then written as config.json. overwrite=True clears results, checkpoints and config.json first.
  """
  check_path(path)
  if is_finished(path) and not overwrite:
    raise WorkdirError(
      f"workdir {path} already holds a finished run: see {os.path.join(path, 'results.md')} "
      "and results.json. Pass --overwrite to replace it, or choose another --workdir."
    )
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as error:
    raise WorkdirError(f"cannot create workdir {path} ({error.strerror}): choose another --workdir.") from None
  lock = acquire_lock(path)
  try:
    remove_temp_files(path)
    if overwrite and (is_finished(path) or has_state(path) or os.path.exists(os.path.join(path, CONFIG_FILE))):
      print(f"[workdir] --overwrite: removing the previous results and checkpoints in {path}", flush=True)
      clear_results(path)
    if config is not None:
      stored = read_config(path) if has_state(path) else None
      if stored is not None:
        check_same_config(stored, config, f"the checkpoints and files in workdir {path}")
      write_config(path, config)
    yield path
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(lock)
