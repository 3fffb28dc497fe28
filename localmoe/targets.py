"""Multi-context block targets: context topologies and SVD blocks (paper Sections 3.1-3.3).

A target for context d is a K_y x K_x grid of blocks, zero except where the context's topology is active;
every active block is U Sigma V^T with Haar-random orthogonal U, V (Eq. 12).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from localmoe import grid

# Topologies: which cells (i, j) (0-indexed) are active, for a K x K grid.
TOPOLOGIES: dict[str, Callable[[int, int, int], bool]] = {
  "block_diagonal": lambda i, j, k: i == j,  # Eq. 13 / Eq. 19
  "checkerboard": lambda i, j, k: (i + j) % 2 == 1,  # Eq. 14 (odd coordinate sums)
  "upper_shift": lambda i, j, k: j == i + 1,  # Eq. 15: cells (i, i+1)
  "off_diagonal": lambda i, j, k: i != j,  # Eq. 20
  "anti_diagonal": lambda i, j, k: i + j == k - 1,  # MNIST context 0: opposite corners
}


def topology_mask(name: str, k: int) -> np.ndarray:
  """Boolean [k, k] mask of active cells."""
  if name not in TOPOLOGIES:
    raise ValueError(f"topology={name!r} is not known; valid: {sorted(TOPOLOGIES)}.")
  rule = TOPOLOGIES[name]
  return np.array([[rule(i, j, k) for j in range(k)] for i in range(k)], dtype=bool)


def cells_mask(cells: Sequence[Sequence[int]], k: int, one_indexed: bool = True) -> np.ndarray:
  """Mask from an explicit list of (i, j) cells (the paper numbers cells from 1)."""
  mask = np.zeros((k, k), dtype=bool)
  for i, j in cells:
    mask[i - one_indexed, j - one_indexed] = True
  return mask


def haar_orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
  """Haar-distributed n x n orthogonal matrix (QR of a Gaussian with the sign fix of Mezzadri 2007)."""
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))[None, :]


SPECTRA = ("gaussian", "flat", "decaying")


def spectrum(name: str, n: int, rng: np.random.Generator | None = None, decay: float = 4.0) -> np.ndarray:
  """Singular values of one n x n block, with mean square 1 (so the block preserves variance on average).

  gaussian:  singular values of G / sqrt(n) with G an n x n standard Gaussian matrix, drawn per block
             (Marchenko-Pastur shape; E[mean s^2] = 1). "A spectrum scaled by 1/sqrt(d_k)" in the paper's
             words: the raw singular values of G are O(sqrt(n)).
  flat:      s_k = 1 (the block is a random orthogonal matrix).
  decaying:  s_k proportional to exp(-(k - 1) / decay), normalised to mean square 1.
  """
  if name == "gaussian":
    if rng is None:
      raise ValueError("spectrum='gaussian' draws random singular values: pass rng.")
    return np.linalg.svd(rng.standard_normal((n, n)), compute_uv=False) / np.sqrt(n)
  if name == "flat":
    s = np.ones(n)
  elif name == "decaying":
    s = np.exp(-np.arange(n) / decay)
  else:
    raise ValueError(f"spectrum={name!r} is not known; use one of {SPECTRA}.")
  return s / np.sqrt(np.mean(s**2))


def svd_block(rng: np.random.Generator, rows: int, cols: int, singular_values: np.ndarray, scale: float) -> np.ndarray:
  """U diag(s) V^T * scale with Haar U [rows, rows], V [cols, cols] (Eq. 12): [rows, cols]."""
  u = haar_orthogonal(rng, rows)
  v = haar_orthogonal(rng, cols)
  m = min(rows, cols)
  return scale * (u[:, :m] * singular_values[:m][None, :]) @ v[:, :m].T


def block_targets(
  rng: np.random.Generator,
  masks: np.ndarray,
  d_out: int,
  d_in: int,
  spectrum_name: str,
  scale: float = 1.0,
  share_blocks: bool = False,
  decay: float = 4.0,
) -> np.ndarray:
  """Dense targets [D, d_out, d_in] from per-context masks [D, K_y, K_x].

  share_blocks=False: every active block of every context is drawn independently.
  share_blocks=True: cell (i, j) uses the same block in every context where it is active.
  Every block is U diag(s) V^T * scale with s from `spectrum(spectrum_name, ...)`.
  """
  contexts, k_y, k_x = masks.shape
  rows = grid.check_divisible(d_out, k_y, "d_out", "k_y")
  cols = grid.check_divisible(d_in, k_x, "d_in", "k_x")
  shared = {}
  draw = lambda: svd_block(rng, rows, cols, spectrum(spectrum_name, min(rows, cols), rng, decay), scale)
  targets = np.zeros((contexts, k_y, k_x, rows, cols))
  for d in range(contexts):
    for i in range(k_y):
      for j in range(k_x):
        if not masks[d, i, j]:
          continue
        if share_blocks:
          if (i, j) not in shared:
            shared[(i, j)] = draw()
          targets[d, i, j] = shared[(i, j)]
        else:
          targets[d, i, j] = draw()
  return np.stack([grid.assemble(t) for t in targets]).astype(np.float32)
