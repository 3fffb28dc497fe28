"""Experiment drivers. Each module `experiments/<name>.py` defines `run(config, workdir) -> dict` and holds only
what is specific to one experiment; everything shared lives in `localmoe`.

The driver of a config is found from `config.experiment` alone: `config.experiment = "svd_simulation"` runs
`experiments/svd_simulation.py`. Adding an experiment is one config, one driver and one results page
(`docs/experiments/<name>.md`); nothing here is edited. Modules are imported only when used.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """Every experiment: the driver modules of this package that define `run`, sorted."""
  found = []
  for entry in sorted(os.listdir(_HERE)):
    stem, ext = os.path.splitext(entry)
    path = os.path.join(_HERE, entry)
    if ext != ".py" or stem.startswith("_"):
      continue
    with open(path, encoding="utf-8") as f:
      if re.search(r"^def run\(", f.read(), re.M):
        found.append(stem)
  return found


def module(name: str):
  """The driver module of experiment `name`, or a ValueError listing the valid names."""
  if not isinstance(name, str) or name not in names():
    raise ValueError(
      f"config.experiment={name!r} is not a known experiment (a module experiments/<name>.py "
      f"that defines run(config, workdir)); valid: {names()}."
    )
  return importlib.import_module(f"{__name__}.{name}")


def get(name: str) -> Callable[[Any, str], dict]:
  """The `run(config, workdir)` function of experiment `name`."""
  return module(name).run


SHARDING = (None, "", "none", "entries", "data")


def validate(config) -> None:
  """Runs the experiment's `validate(config)` if it has one: every config error before any compute.

  Also checks the fields every experiment may carry: `sharding` (used by sweeps).
  """
  if "sharding" in config and config.sharding not in SHARDING:
    raise ValueError(
      f"config.sharding={config.sharding!r} is not known; valid: 'entries' (sweep entries over "
      "devices), 'data' (batch axis over devices) or 'none'."
    )
  check = getattr(module(config.experiment), "validate", None)
  if check is not None:
    check(config)
