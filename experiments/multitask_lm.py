"""Multi-task instruction stream on Gemma 3 270M: routed adapters on a decoder LM, the task id as context.

The paper's first open problem (Section 6): Localized LoRA-MoE inside attention and feed-forward sublayers on a
multi-task language benchmark. The question, as in the MiniLM experiment (experiments/multitask_text.py) but
with a decoder and instructions instead of an encoder and heads: does routing on the task id help, at parameter
parity, against the frozen model's zero-/few-shot prompting, a converged linear probe, static adapters and one
LoRA per task? `configs/multitask_lm.py` states the protocol and why.

Pieces from the library: prompts and answer tokens (`localmoe.data.instructions`; the tasks are read by
text.load), the split model (lower blocks once, `Upper` with the answer rows: `localmoe.models.gemma3_features`),
adapters (`localmoe.nnx_inject`, trained functionally through `localmoe.nnx_functional`), methods at parity and
per-task metrics (`localmoe.multitask`), the probe (`train.probe`), the trainer, runner, results, paired
differences (`localmoe.metrics`). The methods are `multitask_lm_methods.py`, the tables and figures
`multitask_lm_report.py`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from localmoe import (
  adapters,
  checkpoint,
  configlib,
  inject,
  metrics,
  multitask,
  results,
  runner,
  train,
)
from localmoe.data import instructions
from localmoe.models import gemma3, gemma3_features, gemma3_weights
from localmoe.train import optimizer, probe

from experiments import multitask_lm_report
from experiments.multitask_lm_methods import BASELINES, FFN, METHODS, TARGET_SHAPES, WIDTH, build_task


def _int(value, field: str, low: int, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{field}={value!r} must be an integer >= {low}: {fix}.")


def validate(config) -> train.Settings:
  """Every config error as one line naming the field and the fix, before anything is loaded or written."""
  names = configlib.split_names(config.method_names)
  unknown = [n for n in names if n not in METHODS]
  if unknown or not names:
    raise ValueError(f"config.method_names={config.method_names!r}: unknown {unknown}; valid: {list(METHODS)}.")
  tasks = instructions.check_tasks(config.data.tasks)
  d, m, e = config.data, config.model, config.eval
  for field in ("train_per_task", "test_per_task", "seed"):
    _int(d[field], f"config.data.{field}", 0, "0 means all rows" if field != "seed" else "e.g. 0")
  _int(d.val_per_task, "config.data.val_per_task", 1, "held-out training rows per task, e.g. 100")
  if d.train_per_task and d.val_per_task >= d.train_per_task:
    raise ValueError(
      f"config.data.val_per_task={d.val_per_task} must be below config.data.train_per_task="
      f"{d.train_per_task} (the held-out rows come out of the training rows)."
    )
  shortest = instructions.min_length(tasks)
  if isinstance(d.max_length, bool) or not isinstance(d.max_length, int) or not shortest <= d.max_length <= 512:
    raise ValueError(
      f"config.data.max_length={d.max_length!r} must lie in {shortest}..512: the longest template "
      f"of these tasks takes {shortest - instructions.MIN_TEXT_TOKENS} tokens and a prompt keeps at "
      f"least {instructions.MIN_TEXT_TOKENS} tokens of its text."
    )
  if isinstance(m.num_layers, bool) or not isinstance(m.num_layers, int) or not 1 <= m.num_layers <= 18:
    raise ValueError(f"config.model.num_layers={m.num_layers!r} must lie in 1..18 (Gemma 3 270M has 18 blocks).")
  if (
    isinstance(m.frozen_layers, bool) or not isinstance(m.frozen_layers, int) or not 0 <= m.frozen_layers < m.num_layers
  ):
    raise ValueError(
      f"config.model.frozen_layers={m.frozen_layers!r} must lie in 0..{m.num_layers - 1} (at "
      "least one block carries adapters)."
    )
  if m.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype={m.dtype!r}: use 'float32' or 'bfloat16'.")
  a = config.adapter
  for field in ("rank", "grid", "num_experts"):
    _int(a[field], f"config.adapter.{field}", 1, "e.g. 8, 2 and 4")
  if isinstance(a.alpha, bool) or not isinstance(a.alpha, (int, float)) or not (a.alpha >= 0 and np.isfinite(a.alpha)):
    raise ValueError(f"config.adapter.alpha={a.alpha!r} must be >= 0 (0: alpha = rank, a scale of 1).")
  for field in (
    "load_balance",
    "z_loss",
    "anchor_weight_decay",
    "anchor_lr_mult",
    "anchor_init_scale",
    "oracle_margin",
  ):
    value, low = (
      config.router[field],
      ("> 0" if field in ("anchor_lr_mult", "anchor_init_scale", "oracle_margin") else ">= 0"),
    )
    if (
      isinstance(value, bool)
      or not isinstance(value, (int, float))
      or not np.isfinite(value)
      or not (value > 0 if low == "> 0" else value >= 0)
    ):
      raise ValueError(f"config.router.{field}={value!r} must be a finite number {low}.")
  grid = multitask.probe_grid(config)
  del grid
  _int(config.probe.max_steps, "config.probe.max_steps", 1, "L-BFGS iterations at most, e.g. 2000")
  _int(config.num_seeds, "config.num_seeds", 1, "e.g. 3")
  _int(config.seed, "config.seed", 0, "e.g. 0")
  for field, low, fix in (
    ("few_shot_k", 1, "demonstrations per class, e.g. 1"),
    ("diagnostic_rows", 1, "e.g. 64"),
    ("generate_rows", 0, "0 skips generation"),
    ("max_new_tokens", 1, "e.g. 6"),
    ("chunk", 1, "rows per compiled call, e.g. 32"),
  ):
    _int(e[field], f"config.eval.{field}", low, fix)
  settings = train.Settings.from_config(config.optim)
  if e.diagnostic_rows > settings.eval_batch_size:
    raise ValueError(
      f"config.eval.diagnostic_rows={e.diagnostic_rows} must be <= config.optim.eval_batch_size="
      f"{settings.eval_batch_size} (they are read from one chunk)."
    )
  if d.train_per_task:  # steps per evaluation, evaluated rows: within one pass
    settings.check_batch(len(tasks) * (d.train_per_task - d.val_per_task))
  for name in names:
    if name in BASELINES:
      continue
    spec = multitask.adapter_spec(name, a, config.router, len(tasks))
    layers = [inject.LayerInfo(f"layers/0/p{i}", d_in, d_out) for i, (d_in, d_out) in enumerate(TARGET_SHAPES)]
    for layer in layers:
      try:
        adapters.make(spec, d_in=layer.d_in, d_out=layer.d_out)
      except ValueError as error:
        raise ValueError(f"config.adapter (method {name}, a {layer.d_in} -> {layer.d_out} layer): {error}") from None
    shapes = jax.eval_shape(
      lambda k, s=spec, ls=layers: {
        "adapter": inject.PerLayer(s).init(k, ls, [jnp.zeros((l.d_in, l.d_out)) for l in ls])
      },
      jax.random.PRNGKey(0),
    )
    rules = train.parse_groups(multitask.method_groups(name, config))
    if rules:
      optimizer.group_sizes(dataclasses.replace(settings, groups=rules), shapes, where=f" (method {name})")
  rows = len(tasks) * ((d.train_per_task or 3000) + (d.test_per_task or 3000))
  train.check_memory(
    4 * (gemma3_weights.param_count(m.num_layers) * 2 + rows * d.max_length * WIDTH)
    + config.num_seeds * settings.batch_size * d.max_length * FFN * 40 * (m.num_layers - m.frozen_layers),
    "this run",
    "lower data.train_per_task, data.max_length, optim.batch_size or num_seeds",
  )
  return settings


def run(config, workdir: str) -> dict:
  settings = validate(config)
  start = time.perf_counter()
  names, m, ev = configlib.split_names(config.method_names), config.model, config.eval
  tasks = tuple(configlib.split_names(config.data.tasks))
  loaded = instructions.subsets(config.data, tasks)
  dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
  model, tokenizer = gemma3.load(num_layers=m.num_layers, dtype=dtype)
  prompts = instructions.build(loaded, tokenizer, config.data.max_length, config.data.val_per_task, config.data.seed)
  os.makedirs(workdir, exist_ok=True)
  k, seeds = m.frozen_layers, list(range(config.seed, config.seed + config.num_seeds))
  t0 = time.perf_counter()
  splits = {s: dict(getattr(prompts, s)) for s in ("train", "val", "test")}
  for split in splits.values():
    split["hidden"] = gemma3_features.lower_hidden(model, split["tokens"], split["mask"], k, ev.chunk)
  data = {s: {key: v[key] for key in ("hidden", "mask", "task", "y")} for s, v in splits.items()}
  upper0 = gemma3_features.Upper(model, k, prompts.answer_ids)
  graph0, state0 = nnx.split(upper0)
  frozen_fn = jax.jit(
    lambda st, h, mask: (lambda u: jnp.concatenate([u.features(h, mask), u(h, mask)], 1))(nnx.merge(graph0, st))
  )  # [B, W + A]
  feats = {
    s: np.split(
      gemma3_features.chunked(lambda h, mask: frozen_fn(state0, h, mask), (d["hidden"], d["mask"]), ev.chunk),
      [WIDTH],
      axis=1,
    )
    for s, d in data.items()
  }
  print(
    f"== multi-task LM: {len(tasks)} tasks ({', '.join(f'{t} {c}' for t, c in prompts.counts.items())}), "
    f"prompts <= {config.data.max_length} tokens, Gemma 3 270M x{m.num_layers} ({m.dtype}), adapters on blocks "
    f"{k + 1}-{m.num_layers} (blocks 1-{k} computed once: {time.perf_counter() - t0:.0f} s), {len(seeds)} seeds, "
    f"{settings.epochs} evaluations x {settings.steps(len(data['train']['task']))} steps of "
    f"{settings.batch_size}",
    flush=True,
  )
  y_test, task_test = data["test"]["y"], data["test"]["task"]
  score = lambda logits: multitask.scores_of_logits(logits, y_test, prompts.tasks, prompts.num_classes)
  tile = lambda scores: {key: np.repeat(v, len(seeds)) for key, v in scores.items()}
  ones = [True] * len(seeds)
  live, layer_names = results.LiveLong(workdir), {}

  def exact_match(upper) -> dict | None:  # greedy generation, first rows of each task
    if not ev.generate_rows:
      return None
    pick = np.concatenate([np.flatnonzero(task_test == t)[: ev.generate_rows] for t in range(len(tasks))])
    words = [prompts.words[task_test[i]][y_test[i, 0]] for i in pick]
    hits = gemma3_features.exact_match(
      model,
      tokenizer,
      splits["test"]["tokens"][pick],
      splits["test"]["mask"][pick],
      task_test[pick],
      words,
      ev.max_new_tokens,
      upper,
    )
    return {t: float(np.mean(hits[task_test[pick] == k])) for k, t in enumerate(tasks)}

  def baseline(name: str) -> dict:
    if name == "zero_shot":
      logits = instructions.task_logits(jnp.asarray(feats["test"][1]), task_test, prompts.class_index)
      return multitask.summary(
        tile(score(np.asarray(logits))), ones, 0, {"exact_match": exact_match(None)}, seeds=seeds
      )
    if name == "few_shot":
      prefixes, pmask = instructions.few_shot_prefixes(prompts, tokenizer, ev.few_shot_k, config.data.seed)
      answer = gemma3_features.few_shot_logits(
        model,
        prefixes,
        pmask,
        splits["test"]["tokens"],
        splits["test"]["mask"],
        task_test,
        prompts.answer_ids,
        ev.chunk,
      )
      logits = instructions.task_logits(jnp.asarray(answer), task_test, prompts.class_index)
      return multitask.summary(
        tile(score(np.asarray(logits))), ones, 0, {"prefix_tokens": int(prefixes.shape[1])}, seeds=seeds
      )
    logits, info = np.full((len(task_test), max(prompts.num_classes)), -1e9, np.float32), {}
    for t, (name_t, classes) in enumerate(zip(prompts.tasks, prompts.num_classes)):
      rows = {s: data[s]["task"] == t for s in ("train", "val", "test")}
      p, info[name_t] = probe.select_l2(
        *(
          jnp.asarray(a)
          for a in (
            feats["train"][0][rows["train"]],
            data["train"]["y"][rows["train"], 0],
            feats["val"][0][rows["val"]],
            data["val"]["y"][rows["val"], 0],
          )
        ),
        multitask.probe_grid(config),
        classes,
        config.probe.max_steps,
      )
      logits[rows["test"], :classes] = feats["test"][0][rows["test"]] @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    return multitask.summary(tile(score(logits)), ones, 0, {"probe": info}, seeds=seeds)

  def train_one(method: runner.Method):
    if method.name in BASELINES:
      summary = baseline(method.name)
      print(
        f"  [{method.name}] test accuracy {summary['accuracy/mean']['mean'] * 100:.2f} ("
        + ", ".join(f"{t} {summary[f'accuracy/{t}']['mean'] * 100:.1f}" for t in tasks)
        + ")",
        flush=True,
      )
      return None, summary
    upper = gemma3_features.Upper(model, k, prompts.answer_ids)
    task, fn, frozen, count = build_task(
      method.name, config, upper, prompts, {key: v[:1] for key, v in data["train"].items()}
    )
    layer_names[method.name] = [
      re.sub(r"^layers/(\d+)/", lambda b: f"block {int(b.group(1)) + k + 1} ", layer.path) for layer in fn.layers
    ]  # Upper's layers/0 = block k + 1
    print(f"[{method.name}] {count:,} adapter parameters", flush=True)
    fit = method.fit(
      task,
      train.Data(train=data["train"], val=data["val"], test=data["test"], frozen=frozen),
      seeds,
      dataclasses.replace(settings, groups=train.parse_groups(multitask.method_groups(method.name, config))),
      log=lambda line: None if line.startswith(f"  [{method.name}] epoch ") else print(line, flush=True),
      on_epoch_end=multitask.live_hook(live, method.name, seeds, prompts.tasks, prompts.num_classes),
    )
    ok = [s == "ok" for s in fit.status]
    final = multitask.task_scores(fit.history[:, -1, -1], prompts.tasks, prompts.num_classes)
    trained = fn.model(jax.tree_util.tree_map(lambda a: a[0], fit.params), frozen)
    extra = {"exact_match": exact_match(trained), "wall_time_s": fit.wall_time_s}
    if "entropy_nats" in fit.diagnostics:
      for key in ("entropy_nats", "task_separation"):
        extra[f"{key}_init"] = float(np.mean(fit.initial_diagnostics[key]))
        extra[f"{key}_end"] = multitask.per_seed(fit.diagnostics[key][:, -1], ok)["mean"]
    summary = multitask.summary(final, ok, count, extra, seeds=seeds)
    print(
      f"  [{method.name}] test accuracy {summary['accuracy/mean']['mean'] * 100:.2f}; {fit.wall_time_s:.0f} s",
      flush=True,
    )
    return fit, summary

  summaries, fits = runner.run_methods(
    names,
    train_one,
    checkpoints=checkpoint.policy(config, workdir),
    log=print,
    failed=lambda name, reason: {"status": reason, "accuracy_per_seed": None},
  )
  paired = {
    mth: {
      f"vs_{ref}": metrics.paired_difference(summaries, mth, ref, "accuracy_per_seed")
      for ref in ("lora", "per_task_lora", "linear_probe", "zero_shot")
      if ref != mth
    }
    for mth in summaries
    if mth not in BASELINES
  }
  markdown = multitask_lm_report.markdown(config, prompts, summaries, paired, time.perf_counter() - start)
  multitask_lm_report.figures(workdir, fits, prompts, layer_names)
  print(markdown, flush=True)
  results.write_run(
    workdir,
    "multitask_lm",
    config,
    summaries,
    {},
    time.perf_counter() - start,
    markdown,
    extra={
      "tasks": list(tasks),
      "counts": prompts.counts,
      "paired_differences": paired,
      "answer_words": [list(w) for w in prompts.words],
    },
    history_csv=live.csv_text(),
    live=live,
  )
  return {"methods": summaries, "paired_differences": paired}
