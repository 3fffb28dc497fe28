"""Experiment drivers. Each module defines `run(config, workdir) -> dict` and holds only what is specific
to one paper experiment; everything shared lives in `localmoe`.

`REGISTRY` maps `config.experiment` to the driver's module; modules are imported only when used.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

REGISTRY: dict[str, str] = {
    "svd_simulation": "experiments.svd_simulation",
    "mnist_adaptation": "experiments.mnist_adaptation",
    "nonconvex_regression": "experiments.nonconvex_regression",
    "california_housing": "experiments.california_housing",
    "mnist_degradation": "experiments.mnist_degradation",
    "mnist_approximation": "experiments.mnist_approximation",
    "multitask_text": "experiments.multitask_text",
}


def module(name: str):
  """The driver module of experiment `name`, or a ValueError listing the valid names."""
  if name not in REGISTRY:
    raise ValueError(f"config.experiment={name!r} is not a known experiment; valid: {sorted(REGISTRY)}.")
  return importlib.import_module(REGISTRY[name])


def get(name: str) -> Callable[[Any, str], dict]:
  """The `run(config, workdir)` function of experiment `name`."""
  return module(name).run


SHARDING = (None, "", "none", "entries", "data")


def validate(config) -> None:
  """Runs the experiment's `validate(config)` if it has one: every config error before any compute.

  Also checks the fields every experiment may carry: `sharding` (used by sweeps).
  """
  if "sharding" in config and config.sharding not in SHARDING:
    raise ValueError(f"config.sharding={config.sharding!r} is not known; valid: 'entries' (sweep entries over "
                     "devices), 'data' (batch axis over devices) or 'none'.")
  check = getattr(module(config.experiment), "validate", None)
  if check is not None:
    check(config)
