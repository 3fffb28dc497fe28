"""MSE and R^2: the one definition used by every experiment.

R^2 = 1 - SSE / SST, where SSE sums squared errors over all samples and output coordinates and SST sums
squared deviations of the targets around each output coordinate's mean over the split (for a vector target
this is sklearn's r2_score(multioutput="variance_weighted"); for a scalar target it is the usual R^2).
R^2 is a fraction (0.38, not 38%).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def sum_squares_total(y: jnp.ndarray) -> jnp.ndarray:
  """SST: y [N, ...outputs] -> scalar, deviations around each output coordinate's mean."""
  return jnp.sum((y - y.mean(axis=0, keepdims=True)) ** 2)


def mse(pred: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Mean over samples and output coordinates."""
  return jnp.mean((pred - y) ** 2)


def r2(pred: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """1 - SSE / SST (fraction). Constant targets (SST = 0) give -inf/nan; callers should not pass them."""
  return 1.0 - jnp.sum((pred - y) ** 2) / sum_squares_total(y)


def paired_difference(summaries, method: str, reference: str, key: str, scale: float = 1.0) -> dict | None:
  """Per seed, scale x (`summaries[method][key]` minus `summaries[reference][key]`) (same seed, same test rows).

  summaries: results.json entries ({"<key>": [per-seed value or None], ...}). Returns {"per_seed", "mean",
  "std", "min", "max"} over the seeds where both are finite (a diverged seed is None), or None when either
  method is missing. Stating a comparison this way removes the variance that the two methods share.
  """
  if method not in summaries or reference not in summaries:
    return None
  a, b = summaries[method].get(key) or [], summaries[reference].get(key) or []
  diffs = [None if x is None or y is None else scale * (float(x) - float(y)) for x, y in zip(a, b)]
  kept = [v for v in diffs if v is not None]
  stat = lambda fn: float(fn(kept)) if kept else None
  return {"per_seed": diffs, "mean": stat(np.mean), "std": stat(np.std), "min": stat(np.min), "max": stat(np.max)}


def format_difference(diff: dict | None, scale: float = 1.0) -> str:
  """'+1.23 ± 0.45 [+0.80, +1.90] over 3 seeds' (x scale), or 'n/a'."""
  if not diff or diff["mean"] is None:
    return "n/a"
  n = sum(v is not None for v in diff["per_seed"])
  return (
    f"{diff['mean'] * scale:+.2f} ± {diff['std'] * scale:.2f} [{diff['min'] * scale:+.2f}, "
    f"{diff['max'] * scale:+.2f}] over {n} seed{'s' if n != 1 else ''}"
  )
