"""Figures for the paper's experiments: learning curves with seed bands, bar charts with error bars, image grids.

matplotlib with the Agg backend (no display needed); every function writes one PNG and returns its path.
Imported lazily by the experiment drivers, so the library does not need matplotlib to train.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def curves_with_bands(
  path: str,
  curves: Mapping[str, np.ndarray],
  *,
  labels: Mapping[str, str] | None = None,
  title: str = "",
  xlabel: str = "epoch",
  ylabel: str = "test R² (%)",
  scale: float = 100.0,
  ylim: tuple[float, float] | None = None,
) -> str:
  """One line per method: the mean over seeds, with a band from the min to the max seed.

  curves: {name: [seeds, epochs]} (NaN entries, e.g. diverged seeds, are ignored); epochs count from 1.
  """
  labels = labels or {}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, values in curves.items():
    values = np.asarray(values, float) * scale  # [seeds, epochs]
    epochs = np.arange(1, values.shape[1] + 1)
    mean = np.nanmean(values, axis=0)
    (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=labels.get(name, name))
    if values.shape[0] > 1:
      ax.fill_between(
        epochs, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=line.get_color(), alpha=0.2, linewidth=0
      )
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def bar_chart(
  path: str,
  names: Sequence[str],
  values: Mapping[str, Sequence[float]],
  *,
  labels: Mapping[str, str] | None = None,
  paper: Mapping[str, float] | None = None,
  title: str = "",
  ylabel: str = "test R² (%)",
  scale: float = 100.0,
) -> str:
  """One bar per method at the mean over seeds, error bar = std over seeds, every seed as a dot.

  values: {name: per-seed values}; paper: {name: the paper's value} drawn as a black tick beside the bar.
  """
  labels = labels or {}
  fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4.5))
  positions = np.arange(len(names))
  drew_paper = False
  for k, name in enumerate(names):
    seeds = np.asarray([v for v in values.get(name, []) if v is not None], float) * scale
    if seeds.size == 0:
      continue
    ax.bar(k, seeds.mean(), yerr=seeds.std() if seeds.size > 1 else None, capsize=5, color=f"C{k}", alpha=0.8)
    ax.scatter(np.full(seeds.size, k) + np.linspace(-0.15, 0.15, seeds.size), seeds, s=10, color="black", zorder=3)
    ax.annotate(
      f"{seeds.mean():.1f}", (k, seeds.mean()), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
    )
    if paper and paper.get(name) is not None:
      ax.plot(  # one "paper" legend entry, on the first method that has a paper value
        [k + 0.3, k + 0.5], [paper[name] * scale] * 2, color="black", linewidth=2, label=None if drew_paper else "paper"
      )
      drew_paper = True
  if drew_paper:
    ax.legend(fontsize=8)
  ax.set_xticks(positions, [labels.get(n, n) for n in names], rotation=20, ha="right", fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)


def image_grid(
  path: str,
  images: np.ndarray,
  *,
  row_labels: Sequence[str] = (),
  col_labels: Sequence[str] = (),
  title: str = "",
  cmap: str = "gray",
  shared_scale: str = "row",
  own_scale_cols: Sequence[int] = (),
) -> str:
  """A grid of images [rows, cols, h, w] (NaN-filled cells are left blank).

  shared_scale: "row" uses one colour range per row (so a target and the methods' outputs are comparable),
  "cell" one per image. Columns in own_scale_cols (e.g. the input) always get their own range.
  """
  images = np.asarray(images, float)
  rows, cols = images.shape[:2]
  fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.8 * rows + 0.4), squeeze=False)
  for r in range(rows):
    shared = [c for c in range(cols) if c not in own_scale_cols]
    finite = images[r][shared][np.isfinite(images[r][shared])]
    row_range = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    for c in range(cols):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if np.all(np.isnan(images[r, c])):
        ax.axis("off")
        continue
      own = shared_scale != "row" or c in own_scale_cols
      vmin, vmax = row_range if not own else (np.nanmin(images[r, c]), np.nanmax(images[r, c]))
      ax.imshow(images[r, c], cmap=cmap, vmin=vmin, vmax=vmax)
      if r == 0 and c < len(col_labels):
        ax.set_title(col_labels[c], fontsize=7)
      if c == 0 and r < len(row_labels):
        ax.set_ylabel(row_labels[r], fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def routing_heatmaps(
  path: str,
  usage: np.ndarray,
  groups: Sequence[str],
  *,
  layer_names: Sequence[str] = (),
  columns: int = 6,
  title: str = "",
) -> str:
  """One heatmap per routed layer: rows = groups (tasks), columns = (router cell, expert), colour = mean gate.

  usage: [layers, groups, routers, E] (rows of each router sum to 1 over E). Cells are separated by white lines,
  so a cell whose routers pick different experts for different tasks shows as a different column per row.
  """
  usage = np.asarray(usage, float)
  layers, num_groups, routers, experts = usage.shape
  rows = int(np.ceil(layers / columns))
  fig, axes = plt.subplots(
    rows, min(columns, layers), figsize=(2.3 * min(columns, layers), 1.0 + 0.9 * rows), squeeze=False
  )
  for index in range(rows * min(columns, layers)):
    ax = axes[index // min(columns, layers)][index % min(columns, layers)]
    ax.set_xticks([])
    ax.set_yticks([])
    if index >= layers:
      ax.axis("off")
      continue
    image = usage[index].reshape(num_groups, routers * experts)  # [groups, routers * E]
    shown = ax.imshow(image, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
    for r in range(1, routers):
      ax.axvline(r * experts - 0.5, color="white", linewidth=1)
    if index % min(columns, layers) == 0:
      ax.set_yticks(range(num_groups))
      ax.set_yticklabels(groups, fontsize=6)
    name = layer_names[index] if index < len(layer_names) else f"layer {index}"
    ax.set_title(name, fontsize=6)
  fig.suptitle(title or f"expert usage ({routers} routers x {experts} experts per layer)", fontsize=9)
  if layers:
    fig.colorbar(shown, ax=axes, shrink=0.6, label=f"mean gate (uniform = {1 / experts:.2f})")
  return _save(fig, path)
