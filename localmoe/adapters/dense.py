"""Dense views of an adapter: Delta W (d_out x d_in) and merged weights for inference."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def delta_weight(module: nn.Module, variables: Any, context=None, gates=None) -> jnp.ndarray:
  """Materialises Delta W: [d_out, d_in].

  Static adapters (LoRA, MELoRA, LocalizedLoRA) need nothing else. Routed adapters need one fixed routing:
  a single `context` (vector [D] or integer label) for context routers, or fixed `gates`
  ([E] block-wise; [K_y, K_x, E] or [E] cell-wise).
  """
  return module.apply(variables, context=context, gates=gates, method=type(module).delta_weight)


def merge(w0: jnp.ndarray, module: nn.Module, variables: Any, context=None, gates=None) -> jnp.ndarray:
  """W0 + Delta W (paper Eq. 9) for inference. w0 uses the paper's layout [d_out, d_in].

  For a Flax Dense kernel (layout [d_in, d_out]) use `merge(kernel.T, ...).T`.
  """
  delta = delta_weight(module, variables, context=context, gates=gates)
  if w0.shape != delta.shape:
    raise ValueError(
      f"w0 has shape {w0.shape} but the adapter's Delta W is {delta.shape} ([d_out, d_in]); "
      "a Flax Dense kernel is [d_in, d_out]: pass kernel.T."
    )
  return w0 + delta.astype(w0.dtype)
