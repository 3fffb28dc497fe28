"""MSE and R^2: the one definition used by every experiment.

R^2 = 1 - SSE / SST, where SSE sums squared errors over all samples and output coordinates and SST sums
squared deviations of the targets around each output coordinate's mean over the split (for a vector target
this is sklearn's r2_score(multioutput="variance_weighted"); for a scalar target it is the usual R^2).
R^2 is a fraction (0.38, not 38%).
"""

from __future__ import annotations

import jax.numpy as jnp


def sum_squares_total(y: jnp.ndarray) -> jnp.ndarray:
  """SST: y [N, ...outputs] -> scalar, deviations around each output coordinate's mean."""
  return jnp.sum((y - y.mean(axis=0, keepdims=True)) ** 2)


def mse(pred: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Mean over samples and output coordinates."""
  return jnp.mean((pred - y) ** 2)


def r2(pred: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """1 - SSE / SST (fraction). Constant targets (SST = 0) give -inf/nan; callers should not pass them."""
  return 1.0 - jnp.sum((pred - y) ** 2) / sum_squares_total(y)
