"""The K_y x K_x cell grid of Localized LoRA (paper Eq. 2-4).

An input x in R^{d_in} is cut into K_x contiguous fields x_j (Eq. 2) and the output into K_y contiguous
segments h_i (Eq. 3). Cell (i, j) maps field j to segment i. This module holds the pure array helpers that
every grid adapter shares: splitting x into fields, merging segments back, and the paper's assembly operator
B[.] that places per-cell blocks into a dense d_out x d_in matrix.

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

import jax.numpy as jnp


def check_divisible(dim: int, parts: int, dim_name: str, parts_name: str) -> int:
  """Returns dim // parts, or raises a ValueError naming both fields and the fix."""
  if parts < 1:
    raise ValueError(f"{parts_name}={parts} must be >= 1.")
  if dim % parts:
    raise ValueError(
        f"{dim_name}={dim} is not divisible by {parts_name}={parts}: choose {parts_name} among the "
        f"divisors of {dim} ({_divisors(dim)}) or pad the layer.")
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
