"""A converged linear probe: multinomial logistic regression on frozen features, solved with L-BFGS.

The baseline an adapter must beat: `fit_logistic` minimises mean cross-entropy + l2 * ||W||^2 (bias not
penalised) until the gradient norm is below PROBE_TOLERANCE; `select_l2` picks the L2 weight with the best
accuracy on held-out rows (never on test) and refits on the training rows.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import optax


PROBE_TOLERANCE = 1e-5  # L-BFGS stops when the gradient norm falls below this


def _lbfgs(objective, init, max_steps: int):
  """Minimises objective(params) from `init` with optax's L-BFGS (zoom line search) until the gradient norm
  is below PROBE_TOLERANCE or `max_steps` iterations. Returns (params, iterations, gradient norm)."""
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state, _, count = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    # The line search leaves the gradient at the new params in the state.
    return (
      optax.apply_updates(params, updates),
      state,
      optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad")),
      count + 1,
    )

  def keep_going(carry):
    _, _, grad_norm, count = carry
    return (count < max_steps) & (grad_norm >= PROBE_TOLERANCE)

  grad0 = optax.tree_utils.tree_norm(jax.grad(objective)(init))
  params, _, grad_norm, count = jax.lax.while_loop(keep_going, step, (init, opt.init(init), grad0, 0))
  return params, count, grad_norm


@functools.partial(jax.jit, static_argnames=("classes", "max_steps"))
def fit_logistic(features, labels, l2, classes: int, max_steps: int):
  """Multinomial logistic regression: mean cross-entropy + l2 * ||W||^2 (bias not penalised), converged.

  features [n, H], labels [n] in 0..classes-1, l2 []. Returns ({"kernel": [H, classes], "bias": [classes]},
  iterations, final gradient norm)."""

  def objective(p):
    logits = features @ p["kernel"] + p["bias"]  # [n, classes]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + l2 * jnp.sum(p["kernel"] ** 2)

  init = {"kernel": jnp.zeros((features.shape[1], classes)), "bias": jnp.zeros((classes,))}
  return _lbfgs(objective, init, max_steps)


def select_l2(x_train, y_train, x_val, y_val, l2_grid: Sequence[float], classes: int, max_steps: int):
  """The probe with the best held-out accuracy over `l2_grid` (ties: the larger weight), refitted on the
  training rows. Returns (params, info) with info = {"l2", "val_accuracy" (per grid value), "iterations",
  "grad_norm", "converged"}."""
  scores = []
  for l2 in l2_grid:
    p, _, _ = fit_logistic(x_train, y_train, jnp.float32(l2), classes, max_steps)
    scores.append(float(jnp.mean(jnp.argmax(x_val @ p["kernel"] + p["bias"], -1) == y_val)))
  best = max(range(len(l2_grid)), key=lambda i: (scores[i], l2_grid[i]))
  params, steps, grad_norm = fit_logistic(x_train, y_train, jnp.float32(l2_grid[best]), classes, max_steps)
  return params, {
    "l2": float(l2_grid[best]),
    "val_accuracy": scores,
    "iterations": int(steps),
    "grad_norm": float(grad_norm),
    "converged": bool(grad_norm < PROBE_TOLERANCE),
  }
