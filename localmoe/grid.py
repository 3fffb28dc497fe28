"""The K_y x K_x cell grid of Localized LoRA (paper Eq. 2-4).

An input x in R^{d_in} is cut into K_x contiguous fields x_j (Eq. 2) and the output into K_y contiguous
segments h_i (Eq. 3). Cell (i, j) maps field j to segment i. This module holds the pure array helpers that
every grid adapter shares: splitting x into fields, merging segments back, and the paper's assembly operator
B[.] that places per-cell blocks into a dense d_out x d_in matrix, and the two GEMM stages with which every
grid adapter applies its cells (`field_matmuls`, `segment_matmuls`).

Why per-field GEMMs. Written as einsums, a grid adapter contracts over a batch axis in the middle of its
operands ("...jd,eijdr->...eijr": fields j sit between the tokens and the field width). XLA lowers such a
batched dot by transposing x (and, in the second stage, the output) so that the batch axis leads, which
costs copies of the two largest activations and makes a grid layer about twice as slow as LoRA at equal
FLOPs. Here both stages are plain 2-D GEMMs instead: stage 1 is ONE GEMM per input field, x_j [N, d_in/K_x]
against every expert of every cell of column j (and, fused in, the router columns that read x_j); stage 2
is ONE GEMM per output segment, the gated codes of row i [N, K_x*E*r] against B_i [K_x*E*r, d_out/K_y].
Same FLOPs and parameters, no transposed copy of x or of the output. The Python loops over K_x fields and
K_y segments unroll at trace time into 2 K GEMMs.

Which form runs is chosen from static shapes (`use_field_gemms`): below FIELD_GEMMS_MIN_ELEMENTS elements
of x (tokens * d_in; e.g. the paper's d = 64 simulations at batch 64) the 2 K extra ops cost more in
dispatch and compile time than the copies they save, so the adapters keep the einsum form there. Measured
on a 2-core CPU. A lone layer, fwd+bwd w.r.t. its params, per-field / einsum time (tokens x d): 1.24 at
256 x 128, 1.27 at 512 x 256, 0.86 at 2048 x 256, 0.79 at 2048 x 512, 0.6-0.7 at 4096 x 1024. Inside a
model the backward also carries the input gradient through every adapter, whose einsum form transposes it
again: one MiniLM-L6 training step (`benchmarks/model_step.py`, every projection adapted, cell-wise /
LoRA step time) takes 1.49x with the einsum form and 1.04x with per-field GEMMs at 16 x 32 tokens
(x: 196,608 elements), 1.20x vs 1.10x at 8 x 16 tokens (49,152 elements). The switch therefore sits at
2^15 elements, below every transformer batch and above the single-layer simulations.

Axis letters used throughout the library's einsums:
  b  any leading batch axes (written `...`)
  e  expert             (E)
  i  output segment     (K_y)
  j  input field        (K_x)
  d  position inside an input field   (d_in / K_x)
  o  position inside an output segment (d_out / K_y)
  r  rank               (r)
  c  context / router-input feature   (D)
"""

from __future__ import annotations

import math

import jax.numpy as jnp


# Per-field GEMMs from this many elements of x (tokens * d_in) on; the einsum form below (see above).
FIELD_GEMMS_MIN_ELEMENTS = 1 << 15


def use_field_gemms(x_shape) -> bool:
  """True when x [..., d_in] is large enough for the per-field GEMM form (static shapes, so trace-time)."""
  return math.prod(x_shape) >= FIELD_GEMMS_MIN_ELEMENTS


def flatten_tokens(x: jnp.ndarray) -> jnp.ndarray:
  """[..., d] -> [N, d] with N the product of the leading axes (a free reshape)."""
  return x.reshape(-1, x.shape[-1])


def check_divisible(dim: int, parts: int, dim_name: str, parts_name: str) -> int:
  """Returns dim // parts, or raises a ValueError naming both fields and the fix."""
  if parts < 1:
    raise ValueError(f"{parts_name}={parts} must be >= 1.")
  if dim % parts:
    raise ValueError(
      f"{dim_name}={dim} is not divisible by {parts_name}={parts}: choose {parts_name} among the "
      f"divisors of {dim} ({_divisors(dim)}) or pad the layer."
    )
  return dim // parts


def _divisors(n: int) -> str:
  divs = [k for k in range(1, n + 1) if n % k == 0]
  return ", ".join(map(str, divs[:12])) + (", ..." if len(divs) > 12 else "")


def split_fields(x: jnp.ndarray, k: int) -> jnp.ndarray:
  """Eq. 2: [..., d] -> [..., k, d/k] (contiguous fields)."""
  return x.reshape(*x.shape[:-1], k, x.shape[-1] // k)


def merge_segments(h: jnp.ndarray) -> jnp.ndarray:
  """Eq. 3 inverse: [..., K_y, d_out/K_y] -> [..., d_out]."""
  return h.reshape(*h.shape[:-2], h.shape[-2] * h.shape[-1])


def assemble(blocks: jnp.ndarray) -> jnp.ndarray:
  """The paper's B[.] operator: per-cell blocks [K_y, K_x, o, d] -> dense [K_y*o, K_x*d]."""
  k_y, k_x, o, d = blocks.shape
  return blocks.transpose(0, 2, 1, 3).reshape(k_y * o, k_x * d)


def disassemble(matrix: jnp.ndarray, k_y: int, k_x: int) -> jnp.ndarray:
  """Inverse of `assemble`: dense [d_out, d_in] -> blocks [K_y, K_x, d_out/K_y, d_in/K_x]."""
  d_out, d_in = matrix.shape
  return matrix.reshape(k_y, d_out // k_y, k_x, d_in // k_x).transpose(0, 2, 1, 3)


def field_matmuls(x: jnp.ndarray, weights: jnp.ndarray, out_dtype=None) -> jnp.ndarray:
  """Stage 1 of a grid adapter: one 2-D GEMM per input field.

  x: [N, K_x*d] (tokens flattened); weights: [K_x, d, F], the F columns that read field j.
  Returns [N, K_x, F] with out[:, j] = x_j @ weights[j], accumulated and returned in `out_dtype`
  (None: the operands' dtype).
  """
  k_x, d, _ = weights.shape
  outs = [
    jnp.matmul(x[:, j * d : (j + 1) * d], weights[j], preferred_element_type=out_dtype) for j in range(k_x)
  ]  # K_x x [N, F]
  return jnp.stack(outs, axis=1)  # [N, K_x, F]


def segment_matmuls(z: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Stage 2 of a grid adapter: one 2-D GEMM per output segment, then Eq. 3's concatenation.

  z: [N, K_y, K_x, E, r], the (gated) rank-space codes of every cell; b: [E, K_y, K_x, d_out/K_y, r].
  Returns h [N, d_out] with h_i = sum_{j, e} B_ij^(e) z_ije, i.e. z[:, i] [N, K_x*E*r] @ B_i [K_x*E*r, o].
  """
  n, k_y = z.shape[0], z.shape[1]
  rows = b.transpose(1, 2, 0, 4, 3).reshape(k_y, -1, b.shape[3])  # [K_y, (j, e, r), o]
  return jnp.concatenate([z[:, i].reshape(n, -1) @ rows[i] for i in range(k_y)], axis=-1)  # [N, d_out]


def expert_columns(a: jnp.ndarray) -> jnp.ndarray:
  """Experts A [E, K_y, K_x, d, r] as stage-1 weights [K_x, d, (i, e, r)]: field j's GEMM codes every cell
  (i, j) and expert e of column j at once."""
  e, k_y, k_x, d, r = a.shape
  return a.transpose(2, 3, 1, 0, 4).reshape(k_x, d, k_y * e * r)  # [K_x, d, K_y*E*r]


def codes_by_cell(columns: jnp.ndarray, k_y: int, e: int) -> jnp.ndarray:
  """Stage-1 output [N, K_x, K_y*E*r] (columns (i, e, r)) -> rank-space codes [N, K_y, K_x, E, r]."""
  n, k_x, _ = columns.shape
  return columns.reshape(n, k_x, k_y, e, -1).transpose(0, 2, 1, 3, 4)
