"""LoRA (paper Eq. 1): Delta(x) = (alpha / r) B A^T x."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from localmoe.adapters import common


class LoRA(nn.Module):
  """Global low-rank update. Parameters: A [d_in, r], B [d_out, r]; 2 * d * r of them when square."""
  d_in: int                                     # input width of the adapted layer
  d_out: int                                    # output width of the adapted layer
  rank: int                                     # r
  alpha: float | None = None                    # scale alpha / r; None -> alpha = r (scale 1)
  a_init: common.Initializer | str = "lora"     # A: U(-1/sqrt(d_in), 1/sqrt(d_in)) (standard LoRA)
  b_init: common.Initializer | str = "zeros"    # B: zeros, so Delta = 0 at init
  allow_overcomplete_rank: bool = False         # permit rank > min(d_in, d_out)

  def __post_init__(self):
    common.check_positive(self.d_in, "d_in")
    common.check_positive(self.d_out, "d_out")
    common.check_rank(self.rank, self.d_out, self.d_in, "weight matrix", self.allow_overcomplete_rank)
    super().__post_init__()

  def setup(self):
    self.A = self.param("A", common.resolve_init(self.a_init, "a_init"), (self.d_in, self.rank))
    self.B = self.param("B", common.resolve_init(self.b_init, "b_init"), (self.d_out, self.rank))

  def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None, gates=None) -> jnp.ndarray:
    """x: [..., d_in] -> Delta(x): [..., d_out]. `context`/`gates` are accepted and ignored (static)."""
    del context, gates
    z = jnp.einsum("...d,dr->...r", x, self.A)                           # [..., r]
    return common.scaling(self.alpha, self.rank) * jnp.einsum("...r,or->...o", z, self.B)

  def delta_weight(self, context=None, gates=None) -> jnp.ndarray:
    """Dense Delta W = (alpha / r) B A^T: [d_out, d_in]."""
    del context, gates
    return common.scaling(self.alpha, self.rank) * self.B @ self.A.T

  def num_params(self) -> int:
    return self.rank * (self.d_in + self.d_out)
