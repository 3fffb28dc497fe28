"""Executable oracles of the paper's grid formulas (Eq. 4, 5-6, 7-8), in the direct einsum form.

The library applies the grid adapters as per-field and per-segment 2-D GEMMs (`localmoe.grid`); these
functions are the literal einsum translation of the equations that the library used before, kept here as
the reference the fast form must reproduce (outputs and gradients). They read the module's fields and the
parameters in the library's layout, A: [E, K_y, K_x, d_in/K_x, r], B: [E, K_y, K_x, d_out/K_y, r], router
kernels [*grid, F, E], and compute in the dtype of x. Axis letters as in `localmoe.grid`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from localmoe import grid
from localmoe import routing
from localmoe.adapters import common


def localized(module, params, x):
  """Eq. 4: h_i = (alpha / r) sum_j B_ij A_ij^T x_j. x: [..., d_in] -> [..., d_out]."""
  cd = x.dtype
  xs = grid.split_fields(x, module.k_x)  # [..., K_x, d_in/K_x]
  z = jnp.einsum("...jd,ijdr->...ijr", xs, params["A"].astype(cd))  # [..., K_y, K_x, r]
  h = jnp.einsum("...ijr,ijor->...io", z, params["B"].astype(cd))  # [..., K_y, d_out/K_y]
  return (common.scaling(module.alpha, module.rank) * grid.merge_segments(h)).astype(cd)


def melora(module, params, x):
  """Diagonal blocks: h_n = (alpha / r) B_n A_n^T x_n. x: [..., d_in] -> [..., d_out]."""
  cd = x.dtype
  xs = grid.split_fields(x, module.num_blocks)  # [..., N, d_in/N]
  z = jnp.einsum("...nd,ndr->...nr", xs, params["A"].astype(cd))  # [..., N, r]
  h = jnp.einsum("...nr,nor->...no", z, params["B"].astype(cd))  # [..., N, d_out/N]
  return (common.scaling(module.alpha, module.rank) * grid.merge_segments(h)).astype(cd)


def router_gates(module, params, u):
  """Eq. 5 / Eq. 7 with the module's bias, temperature and top-k: gates [..., E] or [..., K_y, K_x, E]."""
  p = params["router"]
  kernel = p["kernel"].astype(u.dtype)
  acc = routing.logit_dtype(u.dtype)
  if not module.router_grid:
    logits = jnp.einsum("...c,ce->...e", u, kernel, preferred_element_type=acc)
  elif module.router_per_field:
    logits = jnp.einsum("...jd,ijde->...ije", grid.split_fields(u, module.k_x), kernel, preferred_element_type=acc)
  else:
    logits = jnp.einsum("...c,ijce->...ije", u, kernel, preferred_element_type=acc)
  if module.router_bias:
    logits = logits + p["bias"].astype(acc)
  return routing.gates_from_logits(logits / module.temperature, module.top_k).astype(u.dtype)


def routed(module, params, x, context=None, gates=None):
  """Eq. 6 (block-wise) / Eq. 8 (cell-wise), gates mixed in rank space. x: [..., d_in] -> [..., d_out]."""
  cd = x.dtype
  if gates is None:
    if module.router_input == "context":
      context = jnp.asarray(context)
      if jnp.issubdtype(context.dtype, jnp.integer):
        context = jax.nn.one_hot(context, module.context_dim)
      gates = router_gates(module, params, context.astype(cd))
    else:
      gates = router_gates(module, params, x)
  gates = jnp.asarray(gates).astype(cd)
  if module.router_grid:  # [..., K_y, K_x, E]
    rank_gates = jnp.moveaxis(gates, -1, -3)[..., None]  # [..., E, K_y, K_x, 1]
  else:  # [..., E]
    rank_gates = gates[..., :, None, None, None]  # [..., E, 1, 1, 1]
  xs = grid.split_fields(x, module.k_x)  # [..., K_x, d_in/K_x]
  z = jnp.einsum("...jd,eijdr->...eijr", xs, params["A"].astype(cd))  # [..., E, K_y, K_x, r]
  z = z * rank_gates
  h = jnp.einsum("...eijr,eijor->...io", z, params["B"].astype(cd))  # [..., K_y, d_out/K_y]
  return (common.scaling(module.alpha, module.rank) * grid.merge_segments(h)).astype(cd)


def apply(module, params, x, context=None, gates=None):
  """The oracle of any grid adapter (LocalizedLoRA, MELoRA, BlockWiseLoRAMoE, CellWiseLoRAMoE)."""
  name = type(module).__name__
  if name == "LocalizedLoRA":
    return localized(module, params, x)
  if name == "MELoRA":
    return melora(module, params, x)
  return routed(module, params, x, context, gates)
