"""Test tiers. `python -m pytest -q -m "not slow"` is the quick tier a contributor runs while editing; the
full suite (the README's test command, what CI runs) includes the `slow` tests.

A test is slow where it is defined: `@pytest.mark.slow` on the test, or `pytestmark = pytest.mark.slow` in a
module whose every test launches processes or trains end to end. A test that compiles or trains for 1.5 s or
more on 2 CPU cores (`python -m pytest -m "not slow" --durations=0`) is marked slow. A `network` test (it may
fetch a wheel) is slow as well, by the rule below.

XLA optimisation. The tests compile hundreds of small programs and run each a few times, so compile time
dominates the suite: the test processes, and through `JAX_DISABLE_MOST_OPTIMIZATIONS` the processes they
launch (the experiments' quick runs, the docs pages as scripts), run with `jax_disable_most_optimizations`
(XLA's HLO passes and LLVM at their lowest). What the tests check (equalities within their tolerances,
bit-identical resumes, learned behaviour) does not depend on it; a test that compares bits with a fixture made
by optimised code is marked `xla_optimized` and runs with XLA's defaults. `LOCALMOE_TEST_XLA_OPTIMIZE=1` runs
every test with XLA's defaults, as users run the code.

Compilation cache. The processes the tests launch share one persistent compilation cache
(`LOCALMOE_COMPILATION_CACHE`, see `localmoe.compile_cache`), a directory made empty for the run (by the
pytest-xdist controller, inherited by its workers) and removed at its end: a quick run launched twice (a
failure, then its resume) compiles once, no run reads programs compiled by an earlier run, and nothing is
written into the user's data directory.
"""

import os
import shutil
import tempfile

import jax
import pytest

FAST_COMPILE = os.environ.get("LOCALMOE_TEST_XLA_OPTIMIZE", "").strip().lower() not in ("1", "true", "yes")
jax.config.update("jax_disable_most_optimizations", FAST_COMPILE)
if FAST_COMPILE:
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # the processes the tests launch
_CREATED = pytest.StashKey[str]()  # the run's cache directory, in the process that made it


def pytest_configure(config):
  if hasattr(config, "workerinput"):  # an xdist worker: the controller's directory is in its environment
    return
  path = config.stash[_CREATED] = tempfile.mkdtemp(prefix="localmoe-test-xla-")
  os.environ["LOCALMOE_COMPILATION_CACHE"] = path  # read by the launched processes (`compile_cache.enable`)


def pytest_unconfigure(config):
  path = config.stash.get(_CREATED, None)
  if path is not None:  # the controller removes it once its workers have ended
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _xla_optimized(request):
  """A test marked `xla_optimized` runs with XLA's default optimisation (caches cleared on both sides: the
  flag is not part of JAX's compile-cache key)."""
  if not FAST_COMPILE or request.node.get_closest_marker("xla_optimized") is None:
    yield
    return
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.get_closest_marker("network") is not None:
      item.add_marker(pytest.mark.slow)
