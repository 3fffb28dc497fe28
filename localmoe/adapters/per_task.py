"""One LoRA per context (task), selected by the context: the hard-routed upper baseline of a multi-task stream.

  Delta(x) = (alpha / r) B_t A_t^T x,   t = the example's context (task id)

It is what a context router converges to when every task gets its own experts and nothing is shared; at
parity with one LoRA of rank r over T tasks, each task's LoRA has rank r / T.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from localmoe import routing
from localmoe.adapters import common


class PerTaskLoRA(nn.Module):
  """T LoRAs of rank r. Parameters: A [T, d_in, r], B [T, d_out, r]; T * r * (d_in + d_out) of them."""

  d_in: int  # input width of the adapted layer
  d_out: int  # output width of the adapted layer
  rank: int  # r, rank of every task's LoRA
  context_dim: int  # T, the number of contexts (tasks)
  alpha: float | None = None  # scale alpha / r; None -> 1
  a_init: common.Initializer | str = "lora"
  b_init: common.Initializer | str = "zeros"
  param_dtype: common.Dtype = jnp.float32  # storage dtype of A and B
  dtype: common.Dtype | None = None  # compute dtype; None -> the input's dtype

  # How `localmoe.inject` sees it: routed by the model's context, one (hard) gate per example.
  router_input = "context"
  router_grid = ()
  top_k = 1

  def __post_init__(self):
    common.check_dtypes(self)
    common.check_alpha(self.alpha)
    common.check_positive(self.context_dim, "context_dim")
    common.check_rank(self.rank, self.d_out, self.d_in, "weight matrix", False)
    super().__post_init__()

  def setup(self):
    t, r, pd = self.context_dim, self.rank, common.resolve_dtype(self.param_dtype, "param_dtype")
    self.A = self.param("A", common.resolve_init(self.a_init, "a_init"), (t, self.d_in, r), pd)
    self.B = self.param("B", common.resolve_init(self.b_init, "b_init"), (t, self.d_out, r), pd)

  def route(self, x, context=None) -> jnp.ndarray:
    """One-hot gates [..., T] from labels [...] or a one-hot / scored context [..., T] (its argmax).

    Labels outside 0..T-1 are a ValueError when concrete; traced (under jit) their gates are NaN, so their
    outputs are NaN rather than a silent zero update (`routing.one_hot_labels`).
    """
    del x
    if context is None:
      raise ValueError(
        "PerTaskLoRA selects a LoRA by the context: pass context=<task ids [...] or one-hot [..., context_dim]>."
      )
    context = jnp.asarray(context)
    if jnp.issubdtype(context.dtype, jnp.integer):
      return routing.one_hot_labels(
        context,
        self.context_dim,
        "context",
        "context_dim",
        f"pass ids in 0..{self.context_dim - 1}, or set context_dim to the number of tasks",
      )
    if context.shape[-1] != self.context_dim:
      raise ValueError(f"context has {context.shape[-1]} features but context_dim={self.context_dim}.")
    return jax.nn.one_hot(jnp.argmax(context, -1), self.context_dim)

  def __call__(self, x: jnp.ndarray, context=None, gates=None) -> jnp.ndarray:
    """x: [..., d_in] -> [..., d_out]; gates [..., T] (default: one-hot of the context) mix the T LoRAs."""
    cd = common.compute_dtype(self.dtype, x, self.param_dtype)
    gates = (self.route(x, context) if gates is None else jnp.asarray(gates)).astype(cd)  # [..., T]
    lead = jnp.broadcast_shapes(x.shape[:-1], gates.shape[:-1])
    x2 = jnp.broadcast_to(x.astype(cd), (*lead, self.d_in)).reshape(-1, self.d_in)  # [N, d_in]
    gates = jnp.broadcast_to(gates, (*lead, self.context_dim)).reshape(-1, self.context_dim)  # [N, T]
    t, r = self.context_dim, self.rank
    a = self.A.astype(cd).transpose(1, 0, 2).reshape(self.d_in, t * r)  # [d_in, (t, r)]
    b = self.B.astype(cd).transpose(0, 2, 1).reshape(t * r, self.d_out)  # [(t, r), d_out]
    z = (x2 @ a).reshape(-1, t, r) * gates[..., None]  # [N, T, r]
    h = (z.reshape(-1, t * r) @ b).reshape(*lead, self.d_out)  # [..., d_out]
    return (common.scaling(self.alpha, self.rank) * h).astype(cd)

  def delta_weight(self, context=None, gates=None) -> jnp.ndarray:
    """Dense Delta W [d_out, d_in] of one context (a label or one-hot vector) or of fixed gates [T]."""
    cd = common.compute_dtype(self.dtype, None, self.param_dtype)
    gates = (self.route(None, context) if gates is None else jnp.asarray(gates)).astype(cd)  # [T]
    w = jnp.einsum("t,tor,tdr->od", gates, self.B.astype(cd), self.A.astype(cd))
    return (common.scaling(self.alpha, self.rank) * w).astype(cd)

  def num_params(self) -> int:
    return self.context_dim * self.rank * (self.d_in + self.d_out)
