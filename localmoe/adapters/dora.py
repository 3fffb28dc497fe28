"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation.

  W' = m * (W0 + (alpha / r) B A^T) / ||W0 + (alpha / r) B A^T||_c

with the norm taken per output unit (over d_in; PEFT's `weight.norm(dim=1)` on a [d_out, d_in] weight) and a
learned magnitude m [d_out] initialised to ||W0||_c, so that W' = W0 at initialisation (B = 0).

As an adapter it returns the update of the layer's output, Delta(x) = x (W' - W0), computed without
building W' - W0 row by row:
  Delta(x) = (m / n - 1) * (x W0) + (m / n) * (alpha / r) (x A) B^T,     n = ||W0 + (alpha/r) B A^T||_c.
The norm n is differentiated through (the DoRA paper's gradient-detach trick is not used). The weight-side
terms (W0 + (alpha/r) B A^T, its column norms, m / n) are computed in float32 (or param_dtype when wider)
for a stable norm; the activation-side matmuls run in the compute dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from localmoe.adapters import common


class DoRA(nn.Module):
  """Parameters: A [d_in, r], B [d_out, r], magnitude m [d_out]. Needs the frozen kernel W0 [d_in, d_out]."""

  d_in: int  # input width of the adapted layer
  d_out: int  # output width of the adapted layer
  rank: int  # r
  alpha: float | None = None  # scale alpha / r; None -> 1
  a_init: common.Initializer | str = "lora"
  b_init: common.Initializer | str = "zeros"
  allow_overcomplete_rank: bool = False
  param_dtype: common.Dtype = jnp.float32  # storage dtype of A, B and the magnitude
  dtype: common.Dtype | None = None  # compute dtype; None -> the input's dtype

  uses_base_kernel = True  # `localmoe.inject` passes kernel=W0 [d_in, d_out]

  def __post_init__(self):
    common.check_dtypes(self)
    common.check_alpha(self.alpha)
    common.check_positive(self.d_in, "d_in")
    common.check_positive(self.d_out, "d_out")
    common.check_rank(self.rank, self.d_out, self.d_in, "weight matrix", self.allow_overcomplete_rank)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, kernel: jnp.ndarray | None = None, context=None, gates=None) -> jnp.ndarray:
    """x [..., d_in], kernel W0 [d_in, d_out] -> Delta(x) [..., d_out]."""
    del context, gates
    if kernel is None:
      raise ValueError(
        "DoRA needs the frozen weight: call it with kernel=W0 [d_in, d_out] (localmoe.inject does this for you)."
      )
    if kernel.shape != (self.d_in, self.d_out):
      raise ValueError(
        f"kernel has shape {kernel.shape}; DoRA(d_in={self.d_in}, d_out={self.d_out}) "
        f"needs [d_in, d_out] = {(self.d_in, self.d_out)}."
      )
    pd = common.resolve_dtype(self.param_dtype, "param_dtype")
    cd = common.compute_dtype(self.dtype, x, pd)
    wide = jnp.promote_types(pd, jnp.float32)  # weight-side dtype (the norm)
    a = self.param("A", common.resolve_init(self.a_init, "a_init"), (self.d_in, self.rank), pd)
    b = self.param("B", common.resolve_init(self.b_init, "b_init"), (self.d_out, self.rank), pd)
    m = self.param(
      "magnitude",
      lambda key, shape, dtype: jnp.linalg.norm(kernel.astype(wide), axis=0).astype(dtype),
      (self.d_out,),
      pd,
    )
    s = common.scaling(self.alpha, self.rank)
    merged = kernel.astype(wide) + s * a.astype(wide) @ b.astype(wide).T  # [d_in, d_out]
    ratio = m.astype(wide) / jnp.linalg.norm(merged, axis=0)  # [d_out]
    x, gain, ratio = x.astype(cd), (ratio - 1).astype(cd), ratio.astype(cd)  # m/n - 1 before rounding
    base = jnp.einsum("...d,do->...o", x, kernel.astype(cd))  # x W0: [..., d_out]
    z = jnp.einsum("...d,dr->...r", x, a.astype(cd))  # [..., r]
    low_rank = s * jnp.einsum("...r,or->...o", z, b.astype(cd))  # [..., d_out]
    return (gain * base + ratio * low_rank).astype(cd)

  def num_params(self) -> int:
    return self.rank * (self.d_in + self.d_out) + self.d_out
