"""Truncated-SVD approximation of one MNIST digit (Localized LoRA paper, Table I and Figure 1).

The first test image of digit 2 is treated as a 28x28 matrix W and approximated at a budget of 2rd = 224
parameters (d = 28, r = 4) by three block structures, each block by its truncated SVD (Eckart-Young: the best
approximation of that block at that rank):
  LoRA:           one rank-4 approximation of W                        2 * 28 * 4     = 224
  MELoRA:         4 diagonal 7x7 blocks, rank 4 each, off-diagonal 0   4 * 2 * 7 * 4  = 224
  Localized LoRA: 2x2 grid of 14x14 blocks, rank 2 each                4 * 2 * 14 * 2 = 224
Error = ||W - W_approx||_F / ||W||_F. Deterministic: no training, no seeds.
"""

from __future__ import annotations

import os
import time

import numpy as np

from localmoe import configlib, grid, results
from localmoe.data import mnist

PAPER = {  # Table I: normalised Frobenius error
  "lora": {"params": 224, "error": 0.2313},
  "melora": {"params": 224, "error": 0.9071},
  "localized_lora": {"params": 224, "error": 0.2119},
}
LABELS = {"lora": "LoRA (Global)", "melora": "MELoRA", "localized_lora": "Localized LoRA"}
METHODS = tuple(PAPER)


def truncated_svd(matrix: np.ndarray, rank: int) -> np.ndarray:
  """Best rank-`rank` approximation of matrix [m, n] (Eckart-Young): [m, n]."""
  u, s, vt = np.linalg.svd(matrix, full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def grid_approximation(matrix: np.ndarray, k: int, rank: int, diagonal_only: bool = False) -> np.ndarray:
  """Every cell of a k x k grid replaced by its rank-`rank` truncated SVD (the B[.] operator of Eq. 4).

  diagonal_only=True keeps only the diagonal cells (MELoRA) and sets the others to zero.
  """
  cells = np.asarray(grid.disassemble(matrix, k, k))  # [k, k, m/k, n/k]
  out = np.zeros_like(cells)
  for i in range(k):
    for j in range(k):
      if diagonal_only and i != j:
        continue
      out[i, j] = truncated_svd(cells[i, j], rank)
  return np.asarray(grid.assemble(out))  # [m, n]


def method_params(name: str, spec, m: int, n: int) -> int:
  """Factor parameters of one approximation: rank * (rows + cols) per factorised block."""
  if name == "lora":
    return spec.rank * (m + n)
  if name == "melora":  # N diagonal blocks of (m/N) x (n/N)
    return spec.num_blocks * spec.rank * (m // spec.num_blocks + n // spec.num_blocks)
  return spec.k * spec.k * spec.rank * (m // spec.k + n // spec.k)  # k x k cells of (m/k) x (n/k)


def approximate(name: str, spec, matrix: np.ndarray) -> np.ndarray:
  if name == "lora":
    return truncated_svd(matrix, spec.rank)
  if name == "melora":
    return grid_approximation(matrix, spec.num_blocks, spec.rank, diagonal_only=True)
  return grid_approximation(matrix, spec.k, spec.rank)


def relative_error(matrix: np.ndarray, approx: np.ndarray) -> float:
  """||W - W_approx||_F / ||W||_F."""
  return float(np.linalg.norm(matrix - approx) / np.linalg.norm(matrix))


def pick_image(config) -> tuple[np.ndarray, int]:
  """The `config.data.occurrence`-th (0: first) test image of `config.data.digit`, as float [28, 28] in [0, 1]."""
  raw = mnist.load_mnist()
  index = int(np.flatnonzero(raw["test_labels"] == config.data.digit)[config.data.occurrence])
  return raw["test_images"][index].astype(np.float64) / 255.0, index


def validate(config) -> None:
  """Every config error, before any compute (names the field and the fix)."""
  if config.data.digit not in range(10):
    raise ValueError(f"config.data.digit={config.data.digit} must be a digit 0-9.")
  if config.data.occurrence < 0:
    raise ValueError(f"config.data.occurrence={config.data.occurrence} must be >= 0 (0: the first such image).")
  names = configlib.split_names(config.method_names)
  unknown = [n for n in names if n not in METHODS]
  if unknown or not names:
    raise ValueError(f"config.method_names: {unknown or 'empty'} not among {list(METHODS)} (comma-separated).")
  for name in names:
    spec = config.methods[name]
    parts = 1 if name == "lora" else (spec.num_blocks if name == "melora" else spec.k)
    size = 28 // parts
    if 28 % parts:
      raise ValueError(f"config.methods.{name}: 28 is not divisible by {parts} blocks; use 1, 2, 4, 7, 14 or 28.")
    if not 1 <= spec.rank <= size:
      raise ValueError(f"config.methods.{name}.rank={spec.rank} must lie in 1..{size} (the block size).")


def run(config, workdir: str) -> dict:
  start = time.perf_counter()
  validate(config)
  from localmoe import plots  # pylint: disable=import-outside-toplevel  -- matplotlib only when drawing

  names = configlib.split_names(config.method_names)
  image, index = pick_image(config)  # [28, 28]
  approximations, methods = {}, {}
  for name in names:
    spec = config.methods[name]
    approx = approximate(name, spec, image)
    approximations[name] = approx
    methods[name] = {
      "params": method_params(name, spec, *image.shape),
      "rank": int(spec.rank),
      "error": relative_error(image, approx),
      "paper": PAPER[name],
      "status": "ok",
    }
  plots.image_grid(
    os.path.join(workdir, "figure1.png"),
    np.stack([image] + [approximations[n] for n in names])[None],
    col_labels=["original"] + [f"{LABELS[n]}\nerror {methods[n]['error']:.4f}" for n in names],
    title=f"MNIST test image {index} (digit {config.data.digit}), {methods[names[0]]['params']} parameters each",
    shared_scale="row",
  )
  lines = [
    f"# Truncated-SVD approximation of MNIST test image {index} (digit {config.data.digit})",
    "",
    "Localized LoRA paper, Table I / Figure 1. Normalised Frobenius error ||W - W_approx||_F / ||W||_F.",
    "",
    "| Method | Rank | Params (ours / paper) | Error (ours) | Error (paper) |",
    "|---|---|---|---|---|",
  ]
  for name in names:
    m = methods[name]
    lines.append(
      f"| {LABELS[name]} | {m['rank']} | {m['params']} / {PAPER[name]['params']} | {m['error']:.4f} "
      f"| {PAPER[name]['error']:.4f} |"
    )
  wall = time.perf_counter() - start
  lines += ["", "Figure 1: `figure1.png`.", "", f"Total wall time: {wall:.2f} s.", ""]
  markdown = "\n".join(lines)
  print(markdown, flush=True)
  results.write_run(workdir, "mnist_approximation", config, methods, {}, wall, markdown, extra={"image_index": index})
  print(f"wrote {workdir}/results.json, results.md, figure1.png ({wall:.2f}s total)", flush=True)
  return {"methods": methods, "wall_time_s": wall}
