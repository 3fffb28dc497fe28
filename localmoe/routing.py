"""Routers of Localized LoRA-MoE (paper Eq. 5 and 7) and their diagnostics.

A router maps a router input u to gates over E experts:

  g = Softmax(W_g u / T)                       soft routing, Eq. 5 / Eq. 7 (default)
  g = Softmax over the top-k logits, else 0    top-k routing (exactly k nonzero gates, renormalised)

The router input is either an external context vector (one-hot or an embedding, which is what the paper's
experiments use: W_g is E x D, no bias) or the activations themselves (the whole x for block-wise routing,
Eq. 5, the local field x_j for cell-wise routing, Eq. 7).

A `Router` owns a grid of independent routers: `grid=()` is one global router (block-wise, Eq. 5);
`grid=(K_y, K_x)` is one router per cell (cell-wise, Eq. 7). Its kernel has shape [*grid, F, E].

Every call sows, into the `intermediates` collection, the router logits and gates flattened to
[tokens, routers, E], so that auxiliary losses and diagnostics below can be computed by the trainer
(`module.apply(..., mutable=["intermediates"])`, then `collect_router_outputs`). The paper lists the lack
of load balancing and routing diagnostics as a limitation; these fill that gap.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jnp.ndarray]

ROUTER_INPUTS = ("context", "activation")


def router_kernel_init(key, shape, dtype=jnp.float32):
  """N(0, 1/F) on a kernel [*grid, F, E]: unit-scale logits for unit-scale router inputs."""
  fan_in = shape[-2]
  return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)


def gates_from_logits(logits: jnp.ndarray, top_k: int | None) -> jnp.ndarray:
  """Softmax gates, or exactly `top_k` nonzero gates renormalised over the top-k logits.

  logits: [..., E] -> gates [..., E]. Ties are broken by expert index (lax.top_k), so the number of
  nonzero gates is always exactly k. With k = E this equals the soft softmax.
  """
  num_experts = logits.shape[-1]
  if top_k is None or top_k == num_experts:
    return jax.nn.softmax(logits, axis=-1)
  _, index = jax.lax.top_k(logits, top_k)                               # [..., k]
  keep = jax.nn.one_hot(index, num_experts, dtype=bool).any(axis=-2)    # [..., E]
  masked = jnp.where(keep, logits, -jnp.inf)
  return jax.nn.softmax(masked, axis=-1)


class Router(nn.Module):
  """A grid of independent linear softmax routers (Eq. 5 with `grid=()`, Eq. 7 with `grid=(K_y, K_x)`).

  Input u:
    per_field=False: [..., F], shared by every router in the grid (a context vector, or the whole x).
    per_field=True:  [..., K_x, F], router (i, j) reads field j only (cell-wise activation routing, Eq. 7).
  Output: gates [..., *grid, E] in the compute dtype.

  Dtypes: the logit matmul takes its operands in the compute dtype (`dtype`, else u's dtype) and
  accumulates and returns float32 logits (`preferred_element_type`); bias, temperature, softmax / top-k
  and the sown logits and gates stay float32, for a stable softmax and stable auxiliary losses under
  bfloat16. Only the returned gates are cast to the compute dtype.

  `logits` and `gates` are the two halves of `__call__`, for adapters that compute the logit matmul
  themselves (fused with their own first GEMM): `gates(u @ kernel)` equals `__call__(u)`.
  """
  num_experts: int                              # E
  features: int                                 # F, width of the router input u (D, d_in or d_in/K_x)
  grid: tuple[int, ...] = ()                    # () global router; (K_y, K_x) one router per cell
  per_field: bool = False                       # router (i, j) reads u[..., j, :] (needs grid=(K_y, K_x))
  use_bias: bool = False                        # the paper's routers have no bias
  temperature: float = 1.0                      # logits are divided by this before the softmax
  top_k: int | None = None                      # None: soft routing; k: exactly k nonzero gates
  kernel_init: Initializer = router_kernel_init
  param_dtype: Any = jnp.float32                # storage dtype of the kernel and bias
  dtype: Any = None                             # compute dtype of the logit matmul; None -> u's dtype

  def setup(self):
    pd = jnp.dtype(self.param_dtype)
    self.kernel = self.param("kernel", self.kernel_init, (*self.grid, self.features, self.num_experts), pd)
    if self.use_bias:
      self.bias = self.param("bias", nn.initializers.zeros, (*self.grid, self.num_experts), pd)

  def __call__(self, u: jnp.ndarray) -> jnp.ndarray:
    """u [..., F] (or [..., K_x, F] per field) -> gates [..., *grid, E]."""
    return self.gates(self.logits(u), u.dtype if self.dtype is None else self.dtype)

  def logits(self, u: jnp.ndarray) -> jnp.ndarray:
    """The raw logits u W_g (before bias and temperature), float32: [..., *grid, E]."""
    if u.shape[-1] != self.features:
      raise ValueError(f"the router input has {u.shape[-1]} features but the router was built with "
                       f"features={self.features}.")
    cd = jnp.dtype(u.dtype if self.dtype is None else self.dtype)
    u, kernel, acc = u.astype(cd), self.kernel.astype(cd), logit_dtype(cd)
    if not self.grid:
      return jnp.einsum("...c,ce->...e", u, kernel, preferred_element_type=acc)      # [..., E]
    if self.per_field:
      return jnp.einsum("...jd,ijde->...ije", u, kernel, preferred_element_type=acc)  # [..., K_y, K_x, E]
    return jnp.einsum("...c,ijce->...ije", u, kernel, preferred_element_type=acc)     # [..., K_y, K_x, E]

  def gates(self, logits: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """Raw logits [..., *grid, E] -> gates [..., *grid, E] in `dtype`; sows logits and gates (float32)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if self.use_bias:
      logits = logits + self.bias.astype(logits.dtype)
    logits = logits / self.temperature
    gates = gates_from_logits(logits, self.top_k)
    routers = math.prod(self.grid)
    self.sow("intermediates", "router_logits", logits.reshape(-1, routers, self.num_experts))
    self.sow("intermediates", "router_gates", gates.reshape(-1, routers, self.num_experts))
    return gates.astype(dtype)


def logit_dtype(compute_dtype: Any) -> jnp.dtype:
  """Router logits are float32, or wider when the computation is (float64)."""
  return jnp.promote_types(compute_dtype, jnp.float32)


def num_router_params(num_experts: int, grid: Sequence[int], features: int, use_bias: bool) -> int:
  """Parameters of a router grid: prod(grid) * (F * E [+ E])."""
  return math.prod(grid) * num_experts * (features + int(use_bias))


# ---------------------------------------------------------------------------------------------------------
# Auxiliary losses and diagnostics. All take router outputs flattened to [tokens, routers, E].
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RouterOutputs:
  """Logits and gates of one router grid, each [tokens, routers, E]."""
  logits: jnp.ndarray
  gates: jnp.ndarray


def collect_router_outputs(intermediates: Any) -> list[RouterOutputs]:
  """Finds every router's sown logits/gates in an `intermediates` collection (any nesting)."""
  found: list[RouterOutputs] = []

  def visit(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
      if "router_logits" in tree and "router_gates" in tree:
        for logits, gates in zip(tree["router_logits"], tree["router_gates"]):
          found.append(RouterOutputs(logits, gates))
      for key, value in tree.items():
        if key not in ("router_logits", "router_gates"):
          visit(value)

  visit(intermediates)
  return found


def _dispatch_fraction(gates: jnp.ndarray, top_k: int) -> jnp.ndarray:
  """Indicator of the top-k experts per token/router, divided by k: [N, R, E], sums to 1 over E."""
  _, index = jax.lax.top_k(gates, top_k)
  return jax.nn.one_hot(index, gates.shape[-1]).sum(axis=-2) / top_k


def load_balancing_loss(gates: jnp.ndarray, top_k: int = 1, per_router: bool = True) -> jnp.ndarray:
  """Switch-Transformer load-balancing loss, E * sum_e f_e * P_e (minimum 1 at uniform use).

  gates: [N, R, E]. f_e is the fraction of tokens dispatched to expert e (top-k indicator / k), P_e the
  mean gate probability. per_router=True computes the loss for every router (cell) over its tokens and
  averages over routers; per_router=False pools all tokens of all routers into one global balance.
  """
  num_experts = gates.shape[-1]
  dispatch = _dispatch_fraction(gates, top_k)
  if per_router:
    f = dispatch.mean(axis=0)                                          # [R, E]
    p = gates.mean(axis=0)                                             # [R, E]
    return (num_experts * (f * p).sum(-1)).mean()
  f = dispatch.reshape(-1, num_experts).mean(axis=0)                   # [E]
  p = gates.reshape(-1, num_experts).mean(axis=0)                      # [E]
  return num_experts * (f * p).sum()


def router_z_loss(logits: jnp.ndarray) -> jnp.ndarray:
  """ST-MoE router z-loss: mean over tokens and routers of logsumexp(logits)^2."""
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def expert_usage(gates: jnp.ndarray) -> jnp.ndarray:
  """Mean gate per router and expert over tokens: [N, R, E] -> [R, E] (rows sum to 1)."""
  return gates.mean(axis=0)


def routing_entropy(gates: jnp.ndarray) -> jnp.ndarray:
  """Mean per-token gate entropy (nats) per router: [N, R, E] -> [R]. 0 = hard routing, log E = uniform."""
  safe = jnp.where(gates > 0, gates, 1.0)
  return -(gates * jnp.log(safe)).sum(-1).mean(0)


def usage_entropy(gates: jnp.ndarray) -> jnp.ndarray:
  """Entropy of each router's mean expert usage: [N, R, E] -> [R]. Low values flag expert collapse."""
  usage = expert_usage(gates)
  safe = jnp.where(usage > 0, usage, 1.0)
  return -(usage * jnp.log(safe)).sum(-1)


def router_aux_losses(intermediates: Any, top_k: int = 1) -> dict[str, jnp.ndarray]:
  """Sums, over every router grid in `intermediates`, the per-cell and global balance losses and z-loss."""
  outputs = collect_router_outputs(intermediates)
  zero = jnp.zeros(())
  return {
      "load_balance_per_cell": sum((load_balancing_loss(o.gates, top_k, True) for o in outputs), zero),
      "load_balance_global": sum((load_balancing_loss(o.gates, top_k, False) for o in outputs), zero),
      "router_z": sum((router_z_loss(o.logits) for o in outputs), zero),
  }
