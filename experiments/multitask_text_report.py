"""Results of the multi-task text experiment: results.json entries, paired differences, the live history, the
markdown tables and the figures.

    summary = multitask_text_report.summarise("lora", fit, seeds, corpus, count, heads)
    paired = multitask_text_report.paired_differences(summaries)        # routed - LoRA etc., per seed
    text = multitask_text_report.markdown(config, corpus, summaries, paired, wall)
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from localmoe import metrics, plots, results, train
from localmoe.data.text_corpus import Corpus
from localmoe.models.heads import BACKBONE_PREFIX
from localmoe.multitask import per_example_metrics, task_scores

from experiments.multitask_text_methods import LABELS


def _per_seed(values: np.ndarray, ok: np.ndarray) -> dict:
  """{"mean", "std", "per_seed"} over the seeds that did not diverge (None where a seed diverged)."""
  values = np.asarray(values, np.float64)
  kept = values[ok]
  return {
    "mean": float(np.mean(kept)) if kept.size else None,
    "std": float(np.std(kept)) if kept.size else None,
    "per_seed": [float(v) if good else None for v, good in zip(values, ok)],
  }


def summarise(method: str, fit: train.FitResult, seeds, corpus: Corpus, count: int, heads: int) -> dict:
  """results.json entry of one trained method: accuracy / macro-F1 per task and their means over ok seeds,
  and for routed methods the router diagnostics at initialisation and at the end."""
  final = task_scores(fit.history[:, -1, -1], corpus.tasks, corpus.num_classes)  # test split
  summary = results.method_summary(
    count + heads,
    seeds,
    fit,
    splits=(),
    extra={"test_accuracy": final["accuracy/mean"], "test_macro_f1": final["macro_f1/mean"]},
  )
  summary.pop("paper")
  ok = np.array([s == "ok" for s in fit.status])
  summary.update(adapter_params=count, head_params=heads, **{k: _per_seed(v, ok) for k, v in final.items()})
  if "entropy_nats" in fit.diagnostics:
    for key, name in (("entropy_nats", "routing_entropy"), ("task_separation", "task_separation")):
      final_v, init_v = fit.diagnostics[key][:, -1], fit.initial_diagnostics[key]
      suffix = "_nats" if key == "entropy_nats" else ""
      summary[f"{name}{suffix}"] = float(np.mean(final_v[ok])) if ok.any() else None
      summary[f"{name}_init{suffix}"] = float(np.mean(init_v))
      summary[f"{name}_per_seed"] = {
        "init": [float(v) for v in init_v],
        "final": [float(v) if good and np.isfinite(v) else None for v, good in zip(final_v, ok)],
      }
  return summary


def probe_summary(logits_test: np.ndarray, corpus: Corpus, seeds, info: dict, heads: int) -> dict:
  """results.json entry of the linear probe (deterministic: the same for every seed)."""
  metrics_fn = per_example_metrics(corpus.num_classes)
  means = np.asarray(jnp.mean(metrics_fn(jnp.asarray(logits_test), jnp.asarray(corpus.test["y"])), 0))
  final = task_scores(means[None], corpus.tasks, corpus.num_classes)
  ok = np.ones(len(seeds), bool)
  tiled = {k: np.repeat(v, len(seeds)) for k, v in final.items()}
  flat = {}
  for key, name in (("accuracy/mean", "test_accuracy"), ("macro_f1/mean", "test_macro_f1")):
    flat.update({name: [float(v) for v in tiled[key]], f"{name}_mean": float(final[key][0]), f"{name}_std": 0.0})
  return {
    "params": heads,
    "adapter_params": 0,
    "head_params": heads,
    "seeds": list(seeds),
    **flat,
    "status": "ok",
    "probe": info,
    **{k: _per_seed(v, ok) for k, v in tiled.items()},
  }


def paired_differences(summaries: dict) -> dict:
  """Per seed, mean test accuracy of each adapter method minus LoRA's, minus one-LoRA-per-task's and minus
  the probe's (same seed, same test rows): {method: {"vs_lora": {...}, ...}} in accuracy points."""
  refs = {"vs_lora": "lora", "vs_per_task_lora": "per_task_lora", "vs_linear_probe": "linear_probe"}
  per_seed = {m: {"accuracy": s["accuracy/mean"]["per_seed"]} for m, s in summaries.items() if "accuracy/mean" in s}
  out = {}
  for method, s in summaries.items():
    if "accuracy/mean" not in s or method in ("linear_probe",):
      continue
    row = {}
    for key, ref in refs.items():
      if ref == method or ref not in summaries or "accuracy/mean" not in summaries[ref]:
        continue
      row[key] = metrics.paired_difference(per_seed, method, ref, "accuracy", scale=100.0)
    if row:
      out[method] = row
  return out


class LiveHistory:
  """The per-evaluation rows and scalars of every method (accuracy and macro-F1 per task and split, training
  loss and aux, router diagnostics), derived from the fit's per-task counts and handed to
  `results.LiveLong`, which writes history.csv and TensorBoard; also the progress line."""

  def __init__(self, workdir: str, corpus: Corpus):
    self.corpus = corpus
    self.files = results.LiveLong(workdir)

  def hook(self, method: str, seeds, settings: train.Settings, train_names: Sequence[str]):
    start = time.perf_counter()

    def rows_of(values, split, name):  # values [seeds, evals]
      return [
        (seeds[s], ev + 1, split, name, float(values[s, ev]))
        for s in range(values.shape[0])
        for ev in range(values.shape[1])
        if np.isfinite(values[s, ev])
      ]

    def on_epoch_end(fit_state: train.FitState) -> None:
      # Scalars are means over the seeds with a finite value; a value no seed has (every seed diverged) is
      # left out of TensorBoard and history.csv and printed as nan.
      e = fit_state.epoch - 1
      rows, scalars = [], {}

      def put(tag, values) -> None:
        kept = np.asarray(values, np.float64)
        kept = kept[np.isfinite(kept)]
        if kept.size:
          scalars[tag] = float(kept.mean())

      for k, split in enumerate(("train", "val", "test")):
        scores = task_scores(fit_state.history[:, :, k], self.corpus.tasks, self.corpus.num_classes)
        for name, values in scores.items():
          rows += rows_of(values, split, name)
          put(f"{split}/{name}", values[:, e])
      for c, name in enumerate(train_names):
        rows += rows_of(fit_state.train_history[:, :, c], "train_stream", name)
        put(f"train_stream/{name}", fit_state.train_history[:, e, c])
      routed = False
      for name in ("entropy_nats", "task_separation"):
        if name in fit_state.diagnostics:
          routed = True
          rows += rows_of(fit_state.diagnostics[name], "routing", name)
          put(f"routing/{name}", fit_state.diagnostics[name][:, e])
      self.files.record(method, rows, scalars, fit_state.epoch)
      nan = float("nan")
      val = scalars.get("val/accuracy/mean", nan)
      per_task = "  ".join(f"{t} {scalars.get(f'val/accuracy/{t}', nan) * 100:5.1f}" for t in self.corpus.tasks)
      routed = (
        f"  router H {scalars.get('routing/entropy_nats', nan):.3f} sep "
        f"{scalars.get('routing/task_separation', nan):.3f}"
        if routed
        else ""
      )
      loss = scalars.get("train_stream/loss", nan)
      print(
        f"  [{method}] eval {fit_state.epoch:>2}/{settings.epochs}  loss {loss:.3f}  "
        f"held-out acc {per_task}  mean {val * 100:5.1f}{routed}  ({time.perf_counter() - start:.0f}s)",
        flush=True,
      )

    return on_epoch_end


def fmt_pm(entry, scale=100.0) -> str:
  if entry.get("mean") is None:
    return "n/a"
  return f"{entry['mean'] * scale:.2f} ± {entry['std'] * scale:.2f}"


def _fmt(value, spec: str = ".3f") -> str:
  """A number, or "n/a" where there is none (every seed diverged)."""
  return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def markdown(config, corpus: Corpus, summaries: dict, paired: dict, wall: float) -> str:
  tasks = corpus.tasks
  d = config.data
  lines = [
    f"# Multi-task text stream on MiniLM-L6 ({config.model.num_layers} layers, frozen; adapters on layers "
    f"{config.model.frozen_layers + 1}-{config.model.num_layers})",
    "",
    "Tasks (train / held-out / test rows): "
    + ", ".join(f"{t} {c['train']:,} / {c['val']:,} / {c['test']:,}" for t, c in corpus.counts.items())
    + f". {d.max_length} tokens at most, {config.num_seeds} seeds, batch {config.optim.batch_size}, "
    f"{config.optim.epochs} x {config.optim.steps_per_epoch or 'one pass'} steps, lr {config.optim.lr}, "
    f"heads from {'the probe (LP-FT)' if config.model.heads == 'probe' else 'N(0, 0.02^2)'}; router losses: "
    f"load balance {config.router.load_balance}, z {config.router.z_loss}; anchors' router: lr x"
    f"{config.router.anchor_lr_mult:g}, weight decay {config.router.anchor_weight_decay:g}, U(+-"
    f"{config.router.anchor_init_scale:g}) start; oracle margin {config.router.oracle_margin:g}.",
    "",
    "Test accuracy % per task, mean over tasks, and macro-F1 % (mean ± std over the seeds that did not "
    "diverge; † marks a method with a diverged seed, left out of its means):",
    "",
    "| Method | Adapter params | " + " | ".join(tasks) + " | mean acc | mean macro-F1 | step (ms) | vs LoRA |",
    "|---|---|" + "---|" * len(tasks) + "---|---|---|---|",
  ]
  for method, s in summaries.items():
    label = LABELS[method] + (" †" if s.get("status", "ok") != "ok" and "accuracy/mean" in s else "")
    if "accuracy/mean" not in s:
      lines.append(f"| {label} | - | " + " | ".join("-" for _ in tasks) + f" | {s['status']} | | | |")
      continue
    step, ratio = s.get("step_time_s"), s.get("step_time_vs_lora")
    lines.append(
      f"| {label} | {s['adapter_params']:,} | "
      + " | ".join(fmt_pm(s[f"accuracy/{t}"]) for t in tasks)
      + f" | {fmt_pm(s['accuracy/mean'])} | {fmt_pm(s['macro_f1/mean'])} | "
      + (f"{step * 1e3:.0f} | {ratio:.2f}x" if step is not None and ratio is not None else "- | -")
      + " |"
    )
  diverged = [(m, s["status"]) for m, s in summaries.items() if "accuracy/mean" in s and s.get("status") != "ok"]
  if diverged:
    lines += [""] + [f"† {LABELS[m]}: {status}" for m, status in diverged]
  lines += ["", "Macro-F1 % per task:", "", "| Method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
  for method, s in summaries.items():
    if "macro_f1/mean" in s:
      dagger = " †" if s.get("status", "ok") != "ok" else ""
      lines.append(f"| {LABELS[method]}{dagger} | " + " | ".join(fmt_pm(s[f"macro_f1/{t}"]) for t in tasks) + " |")
  routed = [(m, s) for m, s in summaries.items() if "routing_entropy_nats" in s]
  if routed:
    lines += [
      "",
      f"Routers on the first {config.eval.diagnostic_rows} test rows (seed mean): mean gate entropy in "
      f"nats (uniform over E = {np.log(config.adapter.num_experts):.3f}) and task separation (total variation "
      "between two tasks' mean gates, averaged over task pairs, cells and layers; 0: all tasks routed "
      "alike, 1: disjoint experts), at initialisation and after training:",
      "",
      "| Method | entropy init | entropy end | separation init | separation end |",
      "|---|---|---|---|---|",
    ]
    lines += [
      f"| {LABELS[m]}{' †' if s.get('status', 'ok') != 'ok' else ''} | "
      + " | ".join(
        _fmt(s.get(key))
        for key in ("routing_entropy_init_nats", "routing_entropy_nats", "task_separation_init", "task_separation")
      )
      + " |"
      for m, s in routed
    ]
  if paired:
    lines += [
      "",
      "Paired differences in mean test accuracy (points), per seed (same seed, same test rows): "
      "mean ± std [min, max] over seeds:",
      "",
      "| Method | − LoRA | − one LoRA per task | − linear probe |",
      "|---|---|---|---|",
    ]
    for method, row in paired.items():
      cells = []
      for key in ("vs_lora", "vs_per_task_lora", "vs_linear_probe"):
        v = row.get(key)
        cells.append(
          "-"
          if v is None or v["mean"] is None
          else f"{v['mean']:+.2f} ± {v['std']:.2f} [{v['min']:+.2f}, {v['max']:+.2f}]"
        )
      lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
  if "linear_probe" in summaries and "probe" in summaries["linear_probe"]:
    info = summaries["linear_probe"]["probe"]
    lines += [
      "",
      "Linear probe: "
      + "; ".join(
        f"{t} L2 {i['l2']:g} ({i['iterations']} L-BFGS steps, gradient norm {i['grad_norm']:.1e})"
        for t, i in info.items()
      )
      + ".",
    ]
  timing = (
    f"Step time: one vmapped training step of all seeds, median of {config.eval.step_time_repeats}, on this machine. "
    if config.eval.step_time_repeats
    else "Step time not measured (eval.step_time_repeats=0). "
  )
  lines += ["", timing + f"Run time {wall:.0f} s."]
  return "\n".join(lines) + "\n"


def _layer_name(path: str) -> str:
  return (
    path.replace(BACKBONE_PREFIX + "encoder/layer_", "L")
    .replace("/attention/self/", " ")
    .replace("/attention/output/dense", " attn out")
    .replace("/intermediate/dense", " ffn in")
    .replace("/output/dense", " ffn out")
  )


def finite_prefix(curves: dict) -> dict:
  """{name: [seeds, evals]} cut after the last evaluation any seed has a finite value at (the seeds all
  diverged there); a method with none is left out of the figure."""
  out = {}
  for name, values in curves.items():
    seen = np.flatnonzero(np.isfinite(np.asarray(values, np.float64)).any(axis=0))
    if seen.size:
      out[name] = np.asarray(values)[:, : seen[-1] + 1]
  return out


def figures(workdir: str, fits: dict, corpus: Corpus, settings: train.Settings, layer_paths: dict) -> None:
  if fits:
    every = f"every {settings.steps_per_epoch or 'pass'} steps"
    curves = finite_prefix(
      {m: task_scores(f.history[:, :, 1], corpus.tasks, corpus.num_classes)["accuracy/mean"] for m, f in fits.items()}
    )  # fractions: plotted in %
    plots.curves_with_bands(
      os.path.join(workdir, "accuracy.png"),
      curves,
      labels=LABELS,
      title="mean held-out accuracy over tasks",
      xlabel=f"evaluation ({every})",
      ylabel="held-out accuracy (%)",
    )
    losses = finite_prefix({m: f.train_history[:, :, 0] for m, f in fits.items()})
    plots.curves_with_bands(
      os.path.join(workdir, "loss.png"),
      losses,
      labels=LABELS,
      title="training loss (mean over the steps of each evaluation)",
      xlabel=f"evaluation ({every})",
      ylabel="cross-entropy",
      scale=1.0,
    )
  for method, fit in fits.items():
    if "usage" not in fit.diagnostics:
      continue
    usage = fit.diagnostics["usage"][0, -1]  # [layers, tasks, routers, E]
    names = [_layer_name(p) for p in layer_paths.get(method, ())]
    plots.routing_heatmaps(
      os.path.join(workdir, f"routing_{method}.png"),
      usage,
      corpus.tasks,
      layer_names=names,
      title=f"{LABELS[method]}: expert usage per layer, cell and task (seed 0, test rows)",
    )
