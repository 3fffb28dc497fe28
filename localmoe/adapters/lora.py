"""LoRA (paper Eq. 1): Delta(x) = (alpha / r) B A^T x."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from localmoe.adapters import common


class LoRA(nn.Module):
  """Global low-rank update. Parameters: A [d_in, r], B [d_out, r]; 2 * d * r of them when square."""

  d_in: int  # input width of the adapted layer
  d_out: int  # output width of the adapted layer
  rank: int  # r
  alpha: float | None = None  # scale alpha / r; None -> alpha = r (scale 1)
  a_init: common.Initializer | str = "lora"  # A: U(-1/sqrt(d_in), 1/sqrt(d_in)) (standard LoRA)
  b_init: common.Initializer | str = "zeros"  # B: zeros, so Delta = 0 at init
  allow_overcomplete_rank: bool = False  # permit rank > min(d_in, d_out)
  param_dtype: common.Dtype = jnp.float32  # storage dtype of A and B
  dtype: common.Dtype | None = None  # compute dtype; None -> the input's dtype

  def __post_init__(self):
    common.check_dtypes(self)
    common.check_alpha(self.alpha)
    common.check_positive(self.d_in, "d_in")
    common.check_positive(self.d_out, "d_out")
    common.check_rank(self.rank, self.d_out, self.d_in, "weight matrix", self.allow_overcomplete_rank)
    super().__post_init__()

  def setup(self):
    pd = common.resolve_dtype(self.param_dtype, "param_dtype")
    self.A = self.param("A", common.resolve_init(self.a_init, "a_init"), (self.d_in, self.rank), pd)
    self.B = self.param("B", common.resolve_init(self.b_init, "b_init"), (self.d_out, self.rank), pd)

  def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None, gates=None) -> jnp.ndarray:
    """Eq. 1. x: [..., d_in] -> Delta(x): [..., d_out] in the compute dtype. `context`/`gates` are ignored."""
    del context, gates
    cd = common.compute_dtype(self.dtype, x, self.param_dtype)
    # Tokens flattened to one axis, so both products are plain 2-D GEMMs: on XLA:CPU the einsum form over
    # [batch, seq, d] lets layout assignment pick a transposed layout for the backward's d x contribution,
    # which then costs a full transposing copy of the layer's input gradient.
    x2 = x.astype(cd).reshape(-1, self.d_in)  # [N, d_in]
    z = x2 @ self.A.astype(cd)  # [N, r]
    h = (z @ self.B.astype(cd).T).reshape(*x.shape[:-1], self.d_out)  # [..., d_out]
    return (common.scaling(self.alpha, self.rank) * h).astype(cd)

  def delta_weight(self, context=None, gates=None) -> jnp.ndarray:
    """Dense Delta W = (alpha / r) B A^T: [d_out, d_in], in `dtype` (else param_dtype)."""
    del context, gates
    cd = common.compute_dtype(self.dtype, None, self.param_dtype)
    return (common.scaling(self.alpha, self.rank) * self.B.astype(cd) @ self.A.astype(cd).T).astype(cd)

  def num_params(self) -> int:
    return self.rank * (self.d_in + self.d_out)
