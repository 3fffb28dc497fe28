"""Static Localized LoRA (paper Eq. 2-4): a K_y x K_x grid of independent rank-r_b cells.

h_i = (alpha / r) sum_j B_ij A_ij^T x_j        (Eq. 4)
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from localmoe import grid
from localmoe.adapters import common


class LocalizedLoRA(nn.Module):
  """Grid adapter. Parameters: A [K_y, K_x, d_in/K_x, r], B [K_y, K_x, d_out/K_y, r]."""

  d_in: int  # input width of the adapted layer
  d_out: int  # output width of the adapted layer
  k_y: int  # K_y output segments (grid rows)
  k_x: int  # K_x input fields (grid columns)
  rank: int  # r_b, rank of every cell
  alpha: float | None = None  # scale alpha / r; None -> 1
  a_init: common.Initializer | str = "lora"
  b_init: common.Initializer | str = "zeros"
  allow_overcomplete_rank: bool = False  # permit rank > cell size
  param_dtype: common.Dtype = jnp.float32  # storage dtype of A and B
  dtype: common.Dtype | None = None  # compute dtype; None -> the input's dtype

  def __post_init__(self):
    common.check_dtypes(self)
    common.check_alpha(self.alpha)
    dx = grid.check_divisible(self.d_in, self.k_x, "d_in", "k_x")
    dy = grid.check_divisible(self.d_out, self.k_y, "d_out", "k_y")
    common.check_rank(self.rank, dy, dx, "grid cell", self.allow_overcomplete_rank)
    super().__post_init__()

  def setup(self):
    cells, r, pd = (self.k_y, self.k_x), self.rank, common.resolve_dtype(self.param_dtype, "param_dtype")
    self.A = self.param("A", common.resolve_init(self.a_init, "a_init"), (*cells, self.d_in // self.k_x, r), pd)
    self.B = self.param("B", common.resolve_init(self.b_init, "b_init"), (*cells, self.d_out // self.k_y, r), pd)

  def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None, gates=None) -> jnp.ndarray:
    """Eq. 4. x: [..., d_in] -> [..., d_out]. Static: `context`/`gates` are ignored.

    Large layers: one 2-D GEMM per input field and one per output segment; small ones: the einsum form
    (`localmoe.grid` says why and where the switch lies).
    """
    del context, gates
    cd = common.compute_dtype(self.dtype, x, self.param_dtype)
    x2, a, b = grid.flatten_tokens(x.astype(cd)), self.A.astype(cd), self.B.astype(cd)  # x2: [N, d_in]
    if grid.use_field_gemms(x.shape):
      z = grid.codes_by_cell(grid.field_matmuls(x2, grid.expert_columns(a[None])), self.k_y, 1)
      h = grid.segment_matmuls(z, b[None])  # z: [N, K_y, K_x, 1, r]; h: [N, d_out]
    else:
      z = jnp.einsum("njd,ijdr->nijr", grid.split_fields(x2, self.k_x), a)  # [N, K_y, K_x, r]
      h = grid.merge_segments(jnp.einsum("nijr,ijor->nio", z, b))  # [N, d_out]
    h = h.reshape(*x.shape[:-1], self.d_out)  # [..., d_out]
    return (common.scaling(self.alpha, self.rank) * h).astype(cd)

  def delta_weight(self, context=None, gates=None) -> jnp.ndarray:
    """Dense Delta W = B[B_ij A_ij^T]: [d_out, d_in]."""
    del context, gates
    cd = common.compute_dtype(self.dtype, None, self.param_dtype)
    blocks = jnp.einsum("ijor,ijdr->ijod", self.B.astype(cd), self.A.astype(cd))  # [K_y, K_x, o, d]
    return (common.scaling(self.alpha, self.rank) * grid.assemble(blocks)).astype(cd)

  def num_params(self) -> int:
    return self.k_y * self.k_x * self.rank * (self.d_in // self.k_x + self.d_out // self.k_y)
