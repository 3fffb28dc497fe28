"""Multi-task text stream on a frozen pretrained transformer (all-MiniLM-L6-v2), the task id as routing context.

The paper's conclusion names this as the next step: routed localized adapters inside a transformer, on an
interleaved multi-task stream where static adapters share one update across tasks ("gradient warfare").
The question: does routing on the task id help, at parameter parity, against a converged linear probe, static
adapters and the hard-routed "no interference" reference? `configs/multitask_text.py` says why the protocol
can answer it (probe, heads from the probe, upper-layer adapters, routers that can learn, test rows).

Data: four real classification tasks (`localmoe.data.text`: topic / spam / question type / sentiment). The
training stream is the union of their training sets; the trainer shuffles it every pass, so the task of each
example is drawn at random. `data.val_per_task` training rows per task are held out (never trained on): the
probe's regularisation is chosen on them and the curves are drawn on them. The task id is the context.

Model: the frozen MiniLM encoder (`localmoe.models.bert`); its lower `model.frozen_layers` layers carry no
adapter, so their output is computed once per example (`bert.hidden_after`) and every step runs the upper
layers only (`bert.Upper`), with adapters on query, key, value, attention output and both FFN projections
of each (`bert.ADAPTER_TARGETS`); mean pooling over the real tokens; one linear head per task (trainable in
every method, kept apart from the adapter count as `trainable_extras`). Methods, at parameter parity with
LoRA of rank r on every adapted layer (`config.adapter`):

  linear_probe               logistic regression per task on the frozen features, converged (reference)
  heads_only                 no adapter: the heads trained by the trainer (from the probe under LP-FT)
  lora                       LoRA, rank r (Eq. 1)
  localized_lora             a K x K grid, rank r / K per cell (Eq. 4)
  blockwise_moe              E experts over the grid, rank r / (K E) per cell, one router on the task id (Eq. 6)
  cellwise_moe               the same experts, an independent router per cell on the task id (Eq. 8)
  *_anchor                   the same, with the anchors' router settings (Poly/MHR: router rate x100 through a
                             parameter group, no router weight decay, U(-1e-3, 1e-3) start)
  cellwise_moe_oracle        cell-wise with every task started on its own expert (task-aligned router start,
                             margin `router.oracle_margin`), the anchors' router rate
  cellwise_moe_activation    cell-wise, each cell's router reads its own input field: no task id (Eq. 7)
  per_task_lora              one LoRA of rank r / T per task, selected by the task id (hard routing)

Metrics per task: test accuracy and macro-F1 (spam is imbalanced); the mean over tasks; mean +- std over the
seeds that did not diverge. Routed methods also report router diagnostics on `eval.diagnostic_rows` test rows
(round-robin over tasks): mean gate entropy in nats and task separation, at initialisation and at every
evaluation. The headline: per seed, the paired differences routed - LoRA and routed - one LoRA per task.
All seeds of a method train in one vmapped program (`localmoe.train.fit`) through `localmoe.runner`.

This file holds the config checks and the run; the pieces live by idea: the classifier and probe heads in
`localmoe.models.heads`, the corpus and frozen features in `localmoe.data.text_corpus`, metrics and specs in
`localmoe.multitask`, each method's Task in `multitask_text_methods.py`, results, tables and figures in
`multitask_text_report.py`.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import adapters, checkpoint, configlib, multitask, results, runner, train
from localmoe.data import text
from localmoe.data.text_corpus import Corpus, load_corpus, lower_features, pooled_features  # noqa: F401
from localmoe.data.text_corpus import subsets as _subsets
from localmoe.models import bert, minilm
from localmoe.models.heads import HIDDEN, NEG, MultiTaskClassifier, head_logits, probe_heads, random_heads  # noqa: F401
from localmoe.multitask import method_groups, metric_names, per_example_metrics, task_scores  # noqa: F401
from localmoe.train.probe import PROBE_TOLERANCE, fit_logistic  # noqa: F401  (the probe's solver)

from experiments.multitask_text_methods import (
  ANCHORED,  # noqa: F401
  LABELS,  # noqa: F401
  METHODS,
  ROUTED,  # noqa: F401
  adapter_spec,  # noqa: F401
  build_task,
  check_method_groups,
  parity_rank,
  trainable_shapes,  # noqa: F401
)
from experiments.multitask_text_report import (
  LiveHistory,
  figures,
  fmt_pm,
  markdown,  # noqa: F401
  paired_differences,
  probe_summary,
  summarise,
)


def estimate_bytes(config, num_tasks: int, rows: int) -> int:
  """Peak bytes of one method's fit: the frozen params, the cached hidden states of `rows` examples, the
  vmapped adapter state, and the activations kept for the backward pass of one batch per seed (float32
  unless the backbone computes in bfloat16)."""
  m, d = config.model, config.data
  layers = m.num_layers - m.frozen_layers
  h, f, heads = HIDDEN, 1536, 12
  act_bytes = 2 if m.dtype == "bfloat16" else 4
  tokens = config.optim.batch_size * d.max_length
  per_layer = tokens * (10 * h + 3 * f) + config.optim.batch_size * heads * d.max_length**2 * 3
  activations = config.num_seeds * layers * per_layer * act_bytes
  eval_acts = config.num_seeds * config.optim.eval_batch_size * d.max_length * (4 * h + f) * act_bytes * 2
  cached = rows * d.max_length * h * act_bytes
  adapter = config.num_seeds * 4 * 6 * layers * 6912 * max(config.adapter.rank, 8) * 4  # params + Adam moments + grads
  return int(minilm.param_bytes(m.num_layers) * 2 + activations * 2 + eval_acts + adapter + 2 * cached)


TARGET_SHAPES = ((HIDDEN, HIDDEN), (HIDDEN, 1536), (1536, HIDDEN))  # (d_in, d_out) of the adapted layers
FULL_TRAIN_ROWS, FULL_TEST_ROWS = 31_000, 12_300  # upper bounds of all four tasks


def _positive_int(value, field: str, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{field}={value!r} must be a positive integer: {fix}.")


def _non_negative_int(value, field: str, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{field}={value!r} must be an integer >= 0: {fix}.")


def validate(config) -> train.Settings:
  """Every config error, one line each naming the field and the fix, before any data is read, anything is
  written or any method trains: every method's adapter is built on every adapted layer shape here."""
  names = configlib.split_names(config.method_names)
  unknown = [n for n in names if n not in METHODS]
  if unknown or not names:
    raise ValueError(f"config.method_names={config.method_names!r}: unknown {unknown}; valid: {list(METHODS)}.")
  tasks = configlib.split_names(config.data.tasks)
  bad = [t for t in tasks if t not in text.TASKS]
  if bad:
    raise ValueError(f"config.data.tasks={config.data.tasks!r}: unknown task(s) {bad}; valid: {list(text.TASKS)}.")
  if len(set(tasks)) != len(tasks) or len(tasks) < 2:
    raise ValueError(f"config.data.tasks={config.data.tasks!r}: name at least two distinct tasks among {text.TASKS}.")
  d, m = config.data, config.model
  for field in ("train_per_task", "test_per_task", "seed"):
    _non_negative_int(d[field], f"config.data.{field}", "0 means all rows" if field != "seed" else "e.g. 0")
  _positive_int(
    d.val_per_task,
    "config.data.val_per_task",
    "the held-out training rows per task (probe regularisation and curves), e.g. 100",
  )
  if d.train_per_task and d.val_per_task >= d.train_per_task:
    raise ValueError(
      f"config.data.val_per_task={d.val_per_task} must be below config.data.train_per_task="
      f"{d.train_per_task} (the held-out rows come out of the training rows)."
    )
  if not isinstance(d.max_length, int) or not 8 <= d.max_length <= minilm.MAX_LENGTH:
    raise ValueError(f"config.data.max_length={d.max_length!r} must lie in 8..{minilm.MAX_LENGTH}.")
  if not isinstance(m.num_layers, int) or not 1 <= m.num_layers <= 6:
    raise ValueError(f"config.model.num_layers={m.num_layers!r} must lie in 1..6 (MiniLM-L6 has 6 layers).")
  if not isinstance(m.frozen_layers, int) or not 0 <= m.frozen_layers < m.num_layers:
    raise ValueError(
      f"config.model.frozen_layers={m.frozen_layers!r} must lie in 0..{m.num_layers - 1} (at "
      "least one layer carries adapters)."
    )
  if m.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype={m.dtype!r}: use 'float32' or 'bfloat16'.")
  if m.heads not in ("probe", "random"):
    raise ValueError(f"config.model.heads={m.heads!r}: use 'probe' (heads start from the linear probe) or 'random'.")
  a = config.adapter
  for field in ("rank", "grid", "num_experts"):
    _positive_int(
      a[field],
      f"config.adapter.{field}",
      {"rank": "e.g. 8", "grid": "K of a K x K grid, e.g. 2", "num_experts": "experts per cell, e.g. 4"}[field],
    )
  if isinstance(a.alpha, bool) or not isinstance(a.alpha, (int, float)) or not (a.alpha >= 0 and np.isfinite(a.alpha)):
    raise ValueError(f"config.adapter.alpha={a.alpha!r} must be >= 0 (0: alpha = rank, a scale of 1).")
  for name in names:
    if name in ("heads_only", "linear_probe"):
      continue
    rank = parity_rank(name, a, len(tasks))
    if rank < 1 or a.rank % (a.grid * a.num_experts) or a.rank % len(tasks) or a.rank % a.grid:
      raise ValueError(
        f"config.adapter.rank={a.rank} does not split at parity for {name} (rank "
        f"{rank} per expert/cell): use a rank divisible by grid={a.grid}, grid*num_experts="
        f"{a.grid * a.num_experts} and the number of tasks ({len(tasks)})."
      )
    spec = adapter_spec(name, a, config.router, len(tasks))
    for d_in, d_out in TARGET_SHAPES:
      try:
        adapters.make(spec, d_in=d_in, d_out=d_out)
      except ValueError as error:
        raise ValueError(f"config.adapter (method {name}, a {d_in} -> {d_out} layer): {error}") from None
  for field in ("load_balance", "z_loss", "anchor_weight_decay"):
    value = config.router[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
      raise ValueError(f"config.router.{field}={value!r} must be >= 0 (0 turns it off).")
  for field in ("anchor_lr_mult", "anchor_init_scale", "oracle_margin"):
    value = config.router[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and np.isfinite(value)):
      raise ValueError(f"config.router.{field}={value!r} must be a finite number > 0.")
  multitask.probe_grid(config)
  _positive_int(config.probe.max_steps, "config.probe.max_steps", "L-BFGS iterations at most, e.g. 2000")
  _positive_int(config.num_seeds, "config.num_seeds", "e.g. 3")
  _non_negative_int(config.seed, "config.seed", "e.g. 0")
  _non_negative_int(config.eval.step_time_repeats, "config.eval.step_time_repeats", "0 skips the step timing")
  _positive_int(config.eval.diagnostic_rows, "config.eval.diagnostic_rows", "e.g. 256")
  settings = train.Settings.from_config(config.optim)
  if config.eval.diagnostic_rows > settings.eval_batch_size:
    raise ValueError(
      f"config.eval.diagnostic_rows={config.eval.diagnostic_rows} must be <= "
      f"config.optim.eval_batch_size={settings.eval_batch_size} (they are read from one chunk)."
    )
  rows = (d.train_per_task or FULL_TRAIN_ROWS // len(tasks)) + (d.test_per_task or FULL_TEST_ROWS // len(tasks))
  train.check_memory(
    estimate_bytes(config, len(tasks), rows * len(tasks)),
    f"one method (num_seeds={config.num_seeds} x batch {config.optim.batch_size} x "
    f"{d.max_length} tokens x {m.num_layers - m.frozen_layers} adapted layers)",
    "lower config.num_seeds, config.optim.batch_size or config.data.max_length",
  )
  check_method_groups(config, names, settings, len(tasks))
  return settings


def run(config, workdir: str) -> dict:
  settings = validate(config)
  start = time.perf_counter()
  names = configlib.split_names(config.method_names)
  dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
  tasks = tuple(configlib.split_names(config.data.tasks))
  subsets = _subsets(config.data, tasks)  # subset sizes are checked before the backbone is loaded
  backbone, backbone_params, tokenizer = minilm.load(num_layers=config.model.num_layers, dtype=dtype)
  corpus = load_corpus(config.data, tokenizer, subsets)
  os.makedirs(workdir, exist_ok=True)
  k = config.model.frozen_layers
  upper = bert.Upper(backbone, k)
  upper_params = bert.upper_params(backbone_params, k, config.model.num_layers)
  t0 = time.perf_counter()
  features = {s: lower_features(backbone, backbone_params, getattr(corpus, s), k) for s in ("train", "val", "test")}
  corpus = dataclasses.replace(corpus, **features)
  pooled = {s: pooled_features(upper, upper_params, getattr(corpus, s)) for s in ("train", "val", "test")}
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  n_train = corpus.train["task"].shape[0]
  sizes = ", ".join(f"{t} {c['train']}/{c['val']}/{c['test']}" for t, c in corpus.counts.items())
  print(
    f"== multi-task text: {len(tasks)} tasks ({sizes} train/held-out/test), {n_train} training rows, "
    f"{config.data.max_length} tokens, MiniLM x{config.model.num_layers} ({config.model.dtype}), adapters on "
    f"layers {k + 1}-{config.model.num_layers} (layers 1-{k} computed once, {time.perf_counter() - t0:.0f} s), "
    f"{len(seeds)} seeds, {settings.epochs} evaluations x {settings.steps(n_train)} steps of "
    f"{settings.batch_size}",
    flush=True,
  )
  print(
    f"   memory estimate {estimate_bytes(config, len(tasks), n_train + len(corpus.test['task'])) / 2**30:.1f} GiB "
    "per method",
    flush=True,
  )

  heads0, probe_info = probe_heads(pooled, corpus, multitask.probe_grid(config), config.probe.max_steps)
  probe_logits = head_logits(heads0, pooled["test"], corpus.test["task"], corpus.num_classes)
  head_count = sum(np.size(l) for l in jax.tree_util.tree_leaves(heads0))
  frozen = {"backbone": upper_params, **heads0}
  data = train.Data(train=corpus.train, val=corpus.val, test=corpus.test, frozen=frozen)
  batch = {key: v[: settings.batch_size] for key, v in corpus.train.items()}
  live = LiveHistory(workdir, corpus)
  step_s, layer_paths = {}, {}

  def train_one(method: runner.Method):
    if method.name == "linear_probe":
      summary = probe_summary(probe_logits, corpus, seeds, probe_info, head_count)
      print(
        f"  [linear_probe] test accuracy {summary['accuracy/mean']['mean'] * 100:.2f} (converged: "
        f"{all(i['converged'] for i in probe_info.values())})",
        flush=True,
      )
      return None, summary
    task, adapted, count, heads = build_task(method.name, config, upper, frozen, corpus, heads0)
    method_settings = dataclasses.replace(settings, groups=train.parse_groups(method_groups(method.name, config)))
    print(f"[{method.name}] {count:,} adapter parameters + {heads:,} head parameters", flush=True)
    fit = method.fit(
      task,
      data,
      seeds,
      method_settings,
      log=_trainer_log(method.name),
      on_epoch_end=live.hook(method.name, seeds, settings, task.train_names),
    )
    if adapted is not None:
      layer_paths[method.name] = adapted.paths
    summary = summarise(method.name, fit, seeds, corpus, count, heads)
    if config.eval.step_time_repeats:
      step_s[method.name] = train.step_seconds(task, fit.params, frozen, batch, config.eval.step_time_repeats)
      summary["step_time_s"] = step_s[method.name]
    mean = summary["accuracy/mean"]
    timing = f"; step {step_s[method.name] * 1e3:.0f} ms" if method.name in step_s else ""
    print(
      f"  [{method.name}] test accuracy {fmt_pm(mean)}, macro-F1 {fmt_pm(summary['macro_f1/mean'])}"
      f"{timing}; {fit.wall_time_s:.0f} s"
      + ("" if fit.status == ["ok"] * len(seeds) else f"; NOT ALL SEEDS OK: {summary['status']}"),
      flush=True,
    )
    return fit, summary

  def failed(name, reason):
    return {"status": reason, "params": None, "adapter_params": None, "head_params": head_count, "seeds": seeds}

  summaries, fits = runner.run_methods(
    names, train_one, failed=failed, checkpoints=checkpoint.policy(config, workdir), log=print
  )
  if "lora" in step_s:
    for method, seconds in step_s.items():
      summaries[method]["step_time_vs_lora"] = seconds / step_s["lora"]
  paired = paired_differences(summaries)
  wall = time.perf_counter() - start
  text_md = markdown(config, corpus, summaries, paired, wall)
  figures(workdir, fits, corpus, settings, layer_paths)
  print(text_md, flush=True)
  results.write_run(
    workdir,
    "multitask_text",
    config,
    summaries,
    {},
    wall,
    text_md,
    extra={"tasks": list(tasks), "counts": corpus.counts, "paired_differences": paired},
    history_csv=live.files.csv_text(),
    live=live.files,
  )
  print(
    f"wrote {workdir}/results.json, results.md, history.csv, tb/, accuracy.png, loss.png, routing_*.png "
    f"({time.perf_counter() - start:.0f} s total)",
    flush=True,
  )
  return {"methods": summaries, "paired_differences": paired}


def _trainer_log(method: str):
  """The trainer's own lines (groups, resume, divergence), without its per-epoch metric line: the live
  history prints a readable one (the raw metrics are per-task counts)."""
  prefix = f"  [{method}] epoch "
  return lambda line: None if line.startswith(prefix) else print(line, flush=True)
