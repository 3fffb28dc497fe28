"""Host-memory estimates: a run refuses, before it starts, what this machine cannot hold."""

from __future__ import annotations

import os

from localmoe.train.settings import Settings


def physical_memory_bytes() -> int | None:
  """RAM of this machine (None where the OS does not say)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def history_bytes(entries: int, settings: Settings, splits: int = 3, metrics_per_split: int = 4) -> int:
  """Host memory of one fit's histories (float64 evaluations, float32 training means), an upper bound."""
  return entries * settings.epochs * (splits * metrics_per_split * 8 + 8 * 4)


def check_memory(nbytes: float, what: str, fix: str) -> None:
  """A ValueError with the estimate when `nbytes` cannot fit in this machine's memory."""
  total = physical_memory_bytes()
  if total is not None and nbytes > 0.8 * total:
    raise ValueError(
      f"{what} needs about {nbytes / 2**30:,.1f} GiB, more than this machine can hold "
      f"({total / 2**30:,.1f} GiB of RAM): {fix}."
    )
