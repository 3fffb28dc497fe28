"""Report of the Gemma 3 multi-task experiment: results.md (accuracy per task, routers at init and end, paired
differences) and the figures (held-out accuracy curves, expert usage per layer, cell and task)."""

from __future__ import annotations

import os

import numpy as np

from localmoe import metrics, multitask, plots

from experiments.multitask_lm_methods import LABELS


def _pm(entry) -> str:
  return "n/a" if not entry or entry.get("mean") is None else f"{entry['mean'] * 100:.1f} ± {entry['std'] * 100:.1f}"


def markdown(config, prompts, summaries: dict, paired: dict, wall: float) -> str:
  tasks, m, a, o = prompts.tasks, config.model, config.adapter, config.optim
  lines = [
    f"# Multi-task instruction stream on Gemma 3 270M ({m.num_layers} blocks, frozen; adapters on blocks "
    f"{m.frozen_layers + 1}-{m.num_layers})",
    "",
    "Rows per task (train / held-out / test): "
    + ", ".join(f"{t} {c['train']} / {c['val']} / {c['test']}" for t, c in prompts.counts.items())
    + f". Prompts <= {config.data.max_length} tokens, {config.num_seeds} seeds, {o.epochs} x "
    f"{o.steps_per_epoch} steps of {o.batch_size}, lr {o.lr}, rank {a.rank} parity (grid {a.grid}, "
    f"{a.num_experts} experts); anchors' router lr x{config.router.anchor_lr_mult:g}.",
    "",
    "Test accuracy % (restricted choice among the task's answer words) per task, mean over tasks, mean "
    "macro-F1 % (mean ± std over seeds), exact match % of greedy generation (seed 0):",
    "",
    "| Method | Adapter params | " + " | ".join(tasks) + " | mean acc | mean macro-F1 | exact match |",
    "|---|---|" + "---|" * len(tasks) + "---|---|---|",
  ]
  for name, s in summaries.items():
    if "accuracy/mean" not in s:
      lines.append(f"| {LABELS[name]} | - | " + " | ".join("-" for _ in tasks) + f" | {s['status']} | | |")
      continue
    em = s.get("exact_match")
    lines.append(
      f"| {LABELS[name]}{'' if s['status'] == 'ok' else ' †'} | {s['adapter_params']:,} | "
      + " | ".join(_pm(s[f"accuracy/{t}"]) for t in tasks)
      + f" | {_pm(s['accuracy/mean'])} | "
      f"{_pm(s['macro_f1/mean'])} | " + ("-" if not em else f"{100 * np.mean(list(em.values())):.0f}") + " |"
    )
  routed = [(n, s) for n, s in summaries.items() if "entropy_nats_init" in s]
  if routed:
    lines += [
      "",
      f"Routers on {config.eval.diagnostic_rows} test rows: mean gate entropy (nats; uniform = "
      f"{np.log(a.num_experts):.3f}) and task separation (0: all tasks alike, 1: disjoint experts):",
      "",
      "| Method | entropy init | entropy end | separation init | separation end |",
      "|---|---|---|---|---|",
    ]
    lines += [
      f"| {LABELS[n]} | "
      + " | ".join(
        "n/a" if s.get(k) is None else f"{s[k]:.3f}"
        for k in ("entropy_nats_init", "entropy_nats_end", "task_separation_init", "task_separation_end")
      )
      + " |"
      for n, s in routed
    ]
  if paired:
    refs = ("lora", "per_task_lora", "linear_probe", "zero_shot")
    lines += [
      "",
      "Paired differences in mean test accuracy (points; same seed, same rows): mean ± std [min, max]:",
      "",
      "| Method | " + " | ".join(f"− {LABELS[r]}" for r in refs) + " |",
      "|---|" + "---|" * len(refs),
    ]
    lines += [
      f"| {LABELS[n]} | " + " | ".join(metrics.format_difference(row.get(f"vs_{r}"), 100) for r in refs) + " |"
      for n, row in paired.items()
    ]
  if "few_shot" in summaries and "prefix_tokens" in summaries["few_shot"]:
    lines += [
      "",
      f"Few-shot: {config.eval.few_shot_k} demonstration(s) per class, prefixes of up to "
      f"{summaries['few_shot']['prefix_tokens']} tokens.",
    ]
  return "\n".join(lines + ["", f"Run time {wall:.0f} s."]) + "\n"


def figures(workdir: str, fits: dict, prompts, layer_names: dict) -> None:
  if fits:
    curves = {
      n: multitask.task_scores(f.history[:, :, 1], prompts.tasks, prompts.num_classes)["accuracy/mean"]
      for n, f in fits.items()
    }
    plots.curves_with_bands(
      os.path.join(workdir, "accuracy.png"),
      curves,
      labels=LABELS,
      ylabel="held-out accuracy (%)",
      title="mean held-out accuracy over tasks",
      xlabel="evaluation",
    )
  for name, fit in fits.items():
    if "usage" in fit.diagnostics:
      plots.routing_heatmaps(
        os.path.join(workdir, f"routing_{name}.png"),
        fit.diagnostics["usage"][0, -1],
        prompts.tasks,
        layer_names=layer_names.get(name, ()),
        title=f"{LABELS[name]}: expert usage per layer, cell and task (seed 0, test rows)",
      )
