"""One atomic writer for every file localmoe writes (results, config.json, history, data and weight caches).

The bytes go to a temporary file `.tmp-<name>-...` in the target's directory (same filesystem, so the rename is
atomic), are flushed and fsync'ed, get the file's final permissions, and replace the target with os.replace:
a reader sees the old file or the complete new one, never a half-written one. On any error the temporary file
is removed and the target is left as it was. `workdir.remove_stale_tmp` clears what a killed write left.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def current_umask() -> int:
  """The process's umask (read without changing it for longer than the call)."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
  """Writes `data` to `path` atomically. mode: the file's permissions (None: 0o666 less the umask, as `open`)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + "-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, (0o666 & ~current_umask()) if mode is None else mode)  # mkstemp makes 0o600
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  _fsync_directory(path.parent)
  return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
  """`write_bytes` of UTF-8 text."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], payload: Any, **dump_kwargs) -> Path:
  """`write_text` of `json.dumps(payload, indent=2, **dump_kwargs)` and a final newline."""
  return write_text(path, json.dumps(payload, indent=2, **dump_kwargs) + "\n")


def _fsync_directory(directory: Path) -> None:
  """Best effort: persists the rename itself (POSIX only; a no-op where directories cannot be opened)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
