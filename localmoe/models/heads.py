"""A multi-task classifier over a frozen encoder's upper layers, and its task heads.

    model = heads.MultiTaskClassifier(bert.Upper(backbone, frozen_layers), num_classes=(4, 2, 6, 2))
    logits = model.apply({"params": {"backbone": upper_params, **task_heads}}, hidden, attention_mask, task)
    heads0, info = heads.probe_heads(pooled, corpus, l2_grid=[1e-4, 1e-3], max_steps=2000)   # LP-FT start

One linear head per task ("head_<t>", kernel [H, width], bias [width], width = the most classes of any task);
the classes a task does not have get the logit NEG. `probe_heads` fits the converged linear probe per task on
pooled frozen features; `head_logits` evaluates heads on such features without the encoder.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from localmoe.models import bert
from localmoe.train import probe

NEG = -1e9  # logit of a class the example's task does not have
HIDDEN = 384  # MiniLM-L6's width
BACKBONE_PREFIX = "backbone/"  # the encoder's params inside the classifier's tree


class MultiTaskClassifier(nn.Module):
  """Upper layers -> mean pool over real tokens -> the example's task head. Logits [B, max classes]; the
  classes a task does not have get a large negative logit."""

  backbone: bert.Upper
  num_classes: tuple[int, ...]  # classes per task

  @nn.compact
  def __call__(self, hidden, attention_mask, task):
    hidden = self.backbone(hidden, attention_mask)  # [B, T, H]
    pooled = bert.mean_pool(hidden, attention_mask).astype(jnp.float32)  # [B, H]
    width = max(self.num_classes)
    logits = jnp.stack([nn.Dense(width, name=f"head_{t}")(pooled) for t in range(len(self.num_classes))], 1)
    logits = jnp.take_along_axis(logits, task[:, None, None], axis=1)[:, 0]  # [B, width]
    valid = jnp.arange(width)[None, :] < jnp.asarray(self.num_classes)[task][:, None]
    return jnp.where(valid, logits, NEG)


def random_heads(key, num_classes: Sequence[int], hidden: int = HIDDEN) -> dict:
  """Fresh task heads: N(0, 0.02^2) kernels, zero biases (BERT's classifier init)."""
  width = max(num_classes)
  keys = jax.random.split(key, len(num_classes))
  return {
    f"head_{t}": {"kernel": 0.02 * jax.random.normal(keys[t], (hidden, width)), "bias": jnp.zeros((width,))}
    for t in range(len(num_classes))
  }


def probe_heads(pooled: dict, corpus, l2_grid: Sequence[float], max_steps: int, log=print):
  """The converged linear probe per task on pooled features {split: [N, H]} of a `text_corpus.Corpus`
  (`train.probe.select_l2`: L2 chosen on the held-out rows, refitted on the training rows). Returns (heads
  {"head_<t>": {"kernel" [H, width], "bias" [width]}} with zero columns for the classes a task lacks,
  {task: info})."""
  width = max(corpus.num_classes)
  heads, info = {}, {}
  for t, (name, classes) in enumerate(zip(corpus.tasks, corpus.num_classes)):
    rows = {split: getattr(corpus, split)["task"] == t for split in ("train", "val")}
    x = {split: jnp.asarray(pooled[split][rows[split]]) for split in rows}
    y = {split: jnp.asarray(getattr(corpus, split)["y"][rows[split], 0]) for split in rows}
    p, info[name] = probe.select_l2(x["train"], y["train"], x["val"], y["val"], l2_grid, classes, max_steps)
    heads[f"head_{t}"] = {
      "kernel": jnp.zeros((HIDDEN, width)).at[:, :classes].set(p["kernel"]),
      "bias": jnp.zeros((width,)).at[:classes].set(p["bias"]),
    }
    if log:
      i = info[name]
      log(
        f"  [linear_probe] {name}: L2 {i['l2']:g} (held-out accuracy "
        + ", ".join(f"{l:g}: {s * 100:.1f}" for l, s in zip(l2_grid, i["val_accuracy"]))
        + f"); {i['iterations']} L-BFGS steps, gradient norm {i['grad_norm']:.1e}"
      )
  return heads, info


def head_logits(heads: dict, pooled: np.ndarray, task: np.ndarray, num_classes: Sequence[int]) -> np.ndarray:
  """Logits [N, width] of each row's task head on pooled features [N, H]; absent classes get NEG."""
  width = max(num_classes)
  logits = np.full((len(task), width), NEG, np.float32)
  for t, classes in enumerate(num_classes):
    rows = task == t
    h = heads[f"head_{t}"]
    logits[rows, :classes] = (pooled[rows] @ np.asarray(h["kernel"]) + np.asarray(h["bias"]))[:, :classes]
  return logits
