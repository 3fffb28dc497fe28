"""JAX's persistent compilation cache for launched runs: a re-run (a resume, a sweep entry, the same table
with another seed) loads its XLA executables from disk instead of compiling them again.

`launch.py` enables it at start-up. Where: `$LOCALMOE_COMPILATION_CACHE` if set (a directory; "off"
disables it), else `<data dir>/jax_compilation_cache` (see `localmoe.data.cache.data_dir`). Entries are
keyed by JAX on the program, the compile options, the backend and the jax/jaxlib versions, so a stale entry
is never used; the directory can be deleted at any time. Every program is stored, however quickly it
compiled (a threshold on compile time would make what is stored depend on how busy the machine is), and the
directory is kept under MAX_BYTES (least recently used entries go first). Processes that share the
directory (a sweep's hosts, runs launched side by side) can race on its bookkeeping files; JAX then warns that
it could not read or write an entry and compiles instead, which costs time, not correctness, so those warnings
stay off the console.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

from localmoe.data import cache

ENV_VAR = "LOCALMOE_COMPILATION_CACHE"
SUBDIR = "jax_compilation_cache"
MIN_COMPILE_SECONDS = 0.0  # store every program: what is stored must not depend on machine load
MAX_BYTES = 2 << 30  # least recently used entries are evicted beyond this
_OFF = ("off", "0", "false", "no", "none")


def enable() -> str | None:
  """Points JAX at the cache directory; returns it, or None when disabled or not writable (runs go on
  without the cache)."""
  value = os.environ.get(ENV_VAR, "").strip()
  if value.lower() in _OFF:
    return None
  path = Path(value).expanduser() if value else cache.data_dir() / SUBDIR
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None
  if not os.access(path, os.W_OK):
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  warnings.filterwarnings("ignore", message=r"Error (reading|writing) persistent compilation cache entry")
  return str(path)
