"""The multi-task classification protocol's shared pieces: methods at parameter parity, metrics per task.

    spec = multitask.adapter_spec("cellwise_moe_anchor", config.adapter, config.router, num_tasks=4)
    groups = multitask.method_groups("cellwise_moe_anchor", config)       # the anchors' router group first
    task = train.Task(..., metric_names=multitask.metric_names(tasks, classes),
                      per_example_metrics=multitask.per_example_metrics(classes))
    scores = multitask.task_scores(fit.history[:, -1, -1], tasks, classes)   # accuracy / macro-F1 per task

Methods (parity with LoRA of rank r on every adapted layer): `lora` (Eq. 1); `localized_lora`, a K x K grid of
rank r / K per cell (Eq. 4); `blockwise_moe` / `cellwise_moe`, E experts of rank r / (K E) per cell with one
router per block / per cell on the task id (Eq. 6 / 8); `_anchor`: the anchors' router settings (Poly/MHR:
router rate x `router.anchor_lr_mult` through a parameter group, weight decay `anchor_weight_decay`,
U(-s, s) start); `cellwise_moe_oracle`: every task started on its own expert (task-aligned start, margin
`router.oracle_margin`) at the anchors' rate; `cellwise_moe_activation`: each cell routes on its own input field
(no task id, Eq. 7); `per_task_lora`: one LoRA of rank r / T per task, chosen by the task id.

Metrics: from per-example indicator columns (`metric_names`) whose split means give, per task, accuracy and
macro-F1 (`task_scores`); y [B, 3] = label, task, counted.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import configlib, train

ADAPTER_METHODS = (
  "lora",
  "localized_lora",
  "blockwise_moe",
  "cellwise_moe",
  "blockwise_moe_anchor",
  "cellwise_moe_anchor",
  "cellwise_moe_oracle",
  "cellwise_moe_activation",
  "per_task_lora",
)
ROUTED = (
  "blockwise_moe",
  "cellwise_moe",
  "blockwise_moe_anchor",
  "cellwise_moe_anchor",
  "cellwise_moe_oracle",
  "cellwise_moe_activation",
)
ANCHORED = ("blockwise_moe_anchor", "cellwise_moe_anchor", "cellwise_moe_oracle")
ROUTER_PATTERN = r"adapter/.*/router/.*"  # the routers' params in a {"adapter": {layer: ...}} tree
LABELS = {
  "lora": "LoRA",
  "localized_lora": "Localized LoRA",
  "blockwise_moe": "Block-wise LoRA-MoE (task id)",
  "cellwise_moe": "Cell-wise LoRA-MoE (task id)",
  "blockwise_moe_anchor": "Block-wise LoRA-MoE (task id, anchors' router)",
  "cellwise_moe_anchor": "Cell-wise LoRA-MoE (task id, anchors' router)",
  "cellwise_moe_oracle": "Cell-wise LoRA-MoE (task id, task-aligned start)",
  "cellwise_moe_activation": "Cell-wise LoRA-MoE (activations, no id)",
  "per_task_lora": "One LoRA per task (hard routing)",
}


def probe_grid(config) -> list[float]:
  """The linear probe's L2 weights, `config.probe.l2` ("1e-4,1e-3,1e-2"), each > 0 and finite."""
  try:
    grid = [float(v) for v in configlib.split_names(config.probe.l2)]
  except ValueError:
    grid = []
  if not grid or any(not (v > 0 and np.isfinite(v)) for v in grid):
    raise ValueError(
      f"config.probe.l2={config.probe.l2!r} must be a comma-separated list of L2 weights > 0, e.g. '1e-4,1e-3,1e-2'."
    )
  return grid


def adapter_spec(method: str, adapter_config, router_config, num_tasks: int) -> dict:
  """The adapter spec of `method` at parity with LoRA of rank `adapter_config.rank` (`config.adapter`: rank,
  grid, num_experts, alpha); a ValueError for a method outside ADAPTER_METHODS or a rank that does not split."""
  r, k, e = adapter_config.rank, adapter_config.grid, adapter_config.num_experts
  if method not in ADAPTER_METHODS:
    raise ValueError(f"config.method_names: {method!r} is not an adapter method; valid: {ADAPTER_METHODS}.")
  divisor = {"lora": 1, "localized_lora": k, "per_task_lora": num_tasks}.get(method, k * e)
  if r % divisor:
    raise ValueError(
      f"config.adapter.rank={r} does not split at parity for {method}: use a rank divisible by "
      f"{divisor} (grid={k}, num_experts={e}, {num_tasks} tasks)."
    )
  common = {"alpha": float(adapter_config.alpha) if adapter_config.alpha else None}
  grid = {"k_y": k, "k_x": k}
  if method == "lora":
    return {"method": "lora", "rank": r, **common}
  if method == "localized_lora":
    return {"method": "localized_lora", "rank": r // k, **grid, **common}
  if method == "per_task_lora":
    return {"method": "per_task_lora", "rank": r // num_tasks, "context_dim": num_tasks, **common}
  spec = {
    "method": "cellwise_moe" if method.startswith("cellwise") else "blockwise_moe",
    "rank": r // (k * e),
    "num_experts": e,
    **grid,
    **common,
  }
  if method == "cellwise_moe_activation":
    return {**spec, "router_input": "activation"}
  spec.update(router_input="context", context_dim=num_tasks)
  if method.endswith("_anchor"):
    spec.update(router_init="uniform", router_init_scale=float(router_config.anchor_init_scale))
  if method == "cellwise_moe_oracle":
    spec.update(router_init="task_aligned", router_init_margin=float(router_config.oracle_margin))
  return spec


ANCHOR_RULE_NOTE = (
  f"the _anchor and _oracle methods add their own rule 'router' (pattern {ROUTER_PATTERN!r}, "
  "config.router.anchor_lr_mult and anchor_weight_decay) before the config's rules"
)


def method_groups(method: str, config) -> list:
  """config.optim.groups of `method`: the anchors' router group first (for ANCHORED), then the config's. A
  config rule named "router" clashes with the anchors' own for ANCHORED: a ValueError saying so."""
  groups = [dataclasses.asdict(rule) for rule in train.parse_groups(config.optim.groups)]
  if method in ANCHORED:
    if any(rule["name"] == "router" for rule in groups):
      raise ValueError(
        f"config.optim.groups={config.optim.groups!r} has a rule named 'router', as has method "
        f"{method}: {ANCHOR_RULE_NOTE}. Set the routers' rate with config.router.anchor_lr_mult "
        "(drop poly_router), or give your rule another name."
      )
    groups = [
      dict(
        name="router",
        pattern=ROUTER_PATTERN,
        lr_mult=float(config.router.anchor_lr_mult),
        weight_decay=float(config.router.anchor_weight_decay),
      )
    ] + groups
  return groups


def metric_names(tasks: Sequence[str], num_classes: Sequence[int]) -> tuple[str, ...]:
  """Per-example columns whose split means give accuracy and macro-F1 per task."""
  names = [f"n/{t}" for t in tasks] + [f"correct/{t}" for t in tasks]
  for t, c in zip(tasks, num_classes):
    names += [f"{kind}/{t}/{k}" for kind in ("tp", "pred", "true") for k in range(c)]
  return tuple(names)


def per_example_metrics(num_classes: Sequence[int]):
  """(logits [B, C], y [B, 3] = label, task, counted) -> [B, len(metric_names)] indicators."""

  def fn(logits, y):
    label, task, counted = y[:, 0], y[:, 1], y[:, 2].astype(jnp.float32)
    pred = jnp.argmax(logits, -1)
    in_task = jax.nn.one_hot(task, len(num_classes)) * counted[:, None]  # [B, tasks]
    cols = [in_task, in_task * (pred == label)[:, None]]
    for t, c in enumerate(num_classes):
      mine = in_task[:, t : t + 1]
      p, l = jax.nn.one_hot(pred, c) * mine, jax.nn.one_hot(label, c) * mine  # [B, c]
      cols += [p * l, p, l]
    return jnp.concatenate(cols, axis=1)

  return fn


def task_scores(means: np.ndarray, tasks: Sequence[str], num_classes: Sequence[int]) -> dict[str, np.ndarray]:
  """Split means [..., metrics] -> {"accuracy/<t>", "macro_f1/<t>", "accuracy/mean", "macro_f1/mean"} [...]."""
  col = {n: i for i, n in enumerate(metric_names(tasks, num_classes))}
  out = {}
  for t, c in zip(tasks, num_classes):
    n = means[..., col[f"n/{t}"]]
    out[f"accuracy/{t}"] = means[..., col[f"correct/{t}"]] / np.where(n > 0, n, np.nan)
    f1 = []
    for k in range(c):
      tp, p, l = (means[..., col[f"{kind}/{t}/{k}"]] for kind in ("tp", "pred", "true"))
      f1.append(np.where(p + l > 0, 2 * tp / np.where(p + l > 0, p + l, 1), 0.0))
    out[f"macro_f1/{t}"] = np.mean(f1, axis=0)
  out["accuracy/mean"] = np.mean([out[f"accuracy/{t}"] for t in tasks], axis=0)
  out["macro_f1/mean"] = np.mean([out[f"macro_f1/{t}"] for t in tasks], axis=0)
  return out


def scores_of_logits(logits: np.ndarray, y: np.ndarray, tasks, num_classes) -> dict[str, np.ndarray]:
  """task_scores of fixed logits [N, C] (a baseline: probe, zero-/few-shot) on rows with labels y [N, 3]."""
  means = np.asarray(jnp.mean(per_example_metrics(num_classes)(jnp.asarray(logits), jnp.asarray(y)), 0))
  return task_scores(means, tasks, num_classes)


def per_seed(values, ok) -> dict:
  """{"mean", "std", "per_seed"} over the seeds that did not diverge (None where one did)."""
  values, ok = np.asarray(values, np.float64), np.asarray(ok, bool)
  kept = values[ok & np.isfinite(values)]
  return {
    "mean": float(kept.mean()) if kept.size else None,
    "std": float(kept.std()) if kept.size else None,
    "per_seed": [float(v) if good and np.isfinite(v) else None for v, good in zip(values, ok)],
  }


def summary(scores: dict, ok, params: int, extra: dict | None = None, seeds=None) -> dict:
  """A results.json entry: every score over the ok seeds (`per_seed`), the trainable parameter count (`params`,
  0 for a frozen-model baseline), a status
  ("ok" or "diverged seeds") and the per-seed mean accuracy under "accuracy_per_seed" (paired differences)."""
  out = {k: per_seed(v, ok) for k, v in scores.items()}
  out.update(
    params=int(params),
    adapter_params=params,
    status="ok" if all(ok) else "diverged seeds",
    accuracy_per_seed=out["accuracy/mean"]["per_seed"],
    **(extra or {}),
  )
  mean = out["accuracy/mean"]  # the launcher's common schema: test accuracy as a fraction
  out.update(
    seeds=[int(s) for s in (seeds if seeds is not None else range(len(mean["per_seed"])))],
    test_accuracy=mean["per_seed"],
    test_accuracy_mean=mean["mean"],
    test_accuracy_std=mean["std"],
  )
  return out


def live_hook(live, method: str, seeds, tasks, num_classes):
  """history.csv / TensorBoard rows at every evaluation (accuracy per task and split, loss, routing) and a line."""
  begin = time.perf_counter()

  def on_epoch_end(state) -> None:
    e, rows, scalars = state.epoch - 1, [], {}
    series = {}
    for i, split in enumerate(("train", "val", "test")):
      for key, v in task_scores(state.history[:, :, i], tasks, num_classes).items():
        series[f"{split}/{key}"] = v
    series["train_stream/loss"] = state.train_history[:, :, 0]
    series.update({f"routing/{key}": v for key, v in state.diagnostics.items() if key != "usage"})
    for tag, v in series.items():
      split, metric = tag.split("/", 1)
      rows += [
        (seeds[s], j + 1, split, metric, float(v[s, j]))
        for s in range(v.shape[0])
        for j in range(e + 1)
        if np.isfinite(v[s, j])
      ]
      if np.isfinite(v[:, e]).any():
        scalars[tag] = float(np.nanmean(v[:, e]))
    live.record(method, rows, scalars, state.epoch)
    nan = float("nan")
    routed = (
      ""
      if "routing/entropy_nats" not in scalars
      else (f"  router H {scalars['routing/entropy_nats']:.3f} sep {scalars.get('routing/task_separation', nan):.3f}")
    )
    print(
      f"  [{method}] eval {state.epoch}  loss {scalars.get('train_stream/loss', nan):.3f}  held-out acc "
      + "  ".join(f"{t} {scalars.get(f'val/accuracy/{t}', nan) * 100:.1f}" for t in tasks)
      + f"{routed}  ({time.perf_counter() - begin:.0f}s)",
      flush=True,
    )

  return on_epoch_end
