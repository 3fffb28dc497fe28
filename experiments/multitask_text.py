"""Multi-task text stream on a frozen pretrained transformer (all-MiniLM-L6-v2), the task id as routing context.

The paper's conclusion names this as the next step: routed localized adapters inside a transformer, on an
interleaved multi-task stream where static adapters share one update across tasks ("gradient warfare").

Data: four real classification tasks (`localmoe.data.text`: topic / spam / question type / sentiment). The
training stream is the union of their training sets; the trainer shuffles it every pass, so the task of each
example is drawn at random (in proportion to the tasks' sizes; the `:cpu` and `:quick` variants take the same
number of examples per task, so there every task is equally likely). The task id is the context.

Model: the frozen MiniLM encoder (`localmoe.models.bert`) with adapters on query, key, value, attention output
and both FFN projections of every layer (`bert.ADAPTER_TARGETS`, 36 layers for 6 blocks), mean pooling over
the real tokens, and one linear head per task (trainable in every method, kept apart from the adapter count
as `trainable_extras`). Methods at parameter parity with LoRA of rank r on every layer (`config.model`):

  heads_only                 no adapter: the frozen backbone's features, a head per task (reference)
  lora                       LoRA, rank r (Eq. 1)
  localized_lora             a K x K grid, rank r / K per cell (Eq. 4)
  blockwise_moe              E experts over the grid, rank r / (K E) per cell, one router on the task id (Eq. 6)
  cellwise_moe               the same experts, an independent router per cell on the task id (Eq. 8)
  cellwise_moe_activation    cell-wise, each cell's router reads its own input field: no task id (Eq. 7)
  per_task_lora              one LoRA of rank r / T per task, selected by the task id (hard routing: the
                             "no interference" reference)

Metrics per task: test accuracy and macro-F1 (spam is imbalanced); the mean over tasks; mean +- std over seeds.
All seeds of a method train in one vmapped program (`localmoe.train.fit`). Router load-balance and z-losses
(`config.router`) enter through the trainer's loss with aux outputs. After training, expert usage per layer,
cell and task is measured on the whole test set and drawn as heatmaps.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from localmoe import checkpoint, configlib, inject, plots, results, train
from localmoe.data import text
from localmoe.models import bert, minilm

METHODS = ("heads_only", "lora", "localized_lora", "blockwise_moe", "cellwise_moe", "cellwise_moe_activation",
           "per_task_lora")
LABELS = {"heads_only": "Frozen backbone, heads only", "lora": "LoRA", "localized_lora": "Localized LoRA",
          "blockwise_moe": "Block-wise LoRA-MoE (task id)", "cellwise_moe": "Cell-wise LoRA-MoE (task id)",
          "cellwise_moe_activation": "Cell-wise LoRA-MoE (activations, no id)",
          "per_task_lora": "One LoRA per task (hard routing)"}
ROUTED = ("blockwise_moe", "cellwise_moe", "cellwise_moe_activation")
NEG = -1e9                                        # logit of a class the example's task does not have


# ------------------------------------------------------------------------------------------- adapters


def adapter_spec(method: str, model_config, num_tasks: int) -> dict | None:
  """The adapter spec of `method` at parity with LoRA of rank r (None: heads only)."""
  r, k, e = model_config.rank, model_config.grid, model_config.num_experts
  common = {"alpha": float(model_config.alpha) if model_config.alpha else None}
  grid = {"k_y": k, "k_x": k}
  if method == "heads_only":
    return None
  if method == "lora":
    return {"method": "lora", "rank": r, **common}
  if method == "localized_lora":
    return {"method": "localized_lora", "rank": r // k, **grid, **common}
  if method in ("blockwise_moe", "cellwise_moe", "cellwise_moe_activation"):
    spec = {"method": "cellwise_moe" if method.startswith("cellwise") else "blockwise_moe",
            "rank": r // (k * e), "num_experts": e, **grid, **common}
    if method == "cellwise_moe_activation":
      return {**spec, "router_input": "activation"}
    return {**spec, "router_input": "context", "context_dim": num_tasks}
  if method == "per_task_lora":
    return {"method": "per_task_lora", "rank": r // num_tasks, "context_dim": num_tasks, **common}
  raise ValueError(f"config.method_names: {method!r} is not a method of this experiment; valid: {METHODS}.")


# ------------------------------------------------------------------------------------------- model


class MultiTaskClassifier(nn.Module):
  """Backbone -> mean pool over real tokens -> the example's task head. Logits [B, max classes]; the classes
  a task does not have get a large negative logit."""
  backbone: bert.Bert
  num_classes: tuple[int, ...]                    # classes per task

  @nn.compact
  def __call__(self, input_ids, attention_mask, task):
    hidden = self.backbone(input_ids, attention_mask)                                 # [B, T, H]
    pooled = bert.mean_pool(hidden, attention_mask).astype(jnp.float32)               # [B, H]
    width = max(self.num_classes)
    logits = jnp.stack([nn.Dense(width, name=f"head_{t}")(pooled) for t in range(len(self.num_classes))], 1)
    logits = jnp.take_along_axis(logits, task[:, None, None], axis=1)[:, 0]           # [B, width]
    valid = jnp.arange(width)[None, :] < jnp.asarray(self.num_classes)[task][:, None]
    return jnp.where(valid, logits, NEG)


BACKBONE_PREFIX = "backbone/"


def head_init(key, num_classes: Sequence[int], hidden: int) -> dict:
  """Fresh task heads for one seed: N(0, 0.02^2) kernels, zero biases (BERT's classifier init)."""
  width = max(num_classes)
  keys = jax.random.split(key, len(num_classes))
  return {f"head_{t}": {"kernel": 0.02 * jax.random.normal(keys[t], (hidden, width)),
                        "bias": jnp.zeros((width,))} for t in range(len(num_classes))}


# ------------------------------------------------------------------------------------------- metrics


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
    tasks = len(num_classes)
    in_task = jax.nn.one_hot(task, tasks) * counted[:, None]                          # [B, tasks]
    correct = in_task * (pred == label)[:, None]
    cols = [in_task, correct]
    for t, c in enumerate(num_classes):
      mine = in_task[:, t:t + 1]
      p, l = jax.nn.one_hot(pred, c) * mine, jax.nn.one_hot(label, c) * mine          # [B, c]
      cols += [p * l, p, l]
    return jnp.concatenate(cols, axis=1)

  return fn


def task_scores(means: np.ndarray, tasks: Sequence[str], num_classes: Sequence[int]) -> dict[str, np.ndarray]:
  """From split means [..., metrics] to accuracy and macro-F1 per task: {"accuracy/<t>", "macro_f1/<t>"} [...]."""
  names = metric_names(tasks, num_classes)
  col = {n: i for i, n in enumerate(names)}
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


# ------------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Corpus:
  tasks: tuple[str, ...]
  num_classes: tuple[int, ...]
  train: dict                                     # input_ids/attention_mask [N, L], task [N], y [N, 3]
  test: dict
  counts: dict                                    # per task: train / test sizes


def load_corpus(data_config, tokenizer) -> Corpus:
  """Tokenised stream and test set, each interleaved round-robin over the tasks: any prefix of the training
  stream is a fixed, task-balanced subset (the trainer evaluates the first `config.optim.eval_train_rows`;
  its shuffling makes the row order irrelevant for training). y [N, 3] = label, task, counted (all 1)."""
  tasks = tuple(data_config.tasks.split(","))
  loaded = {name: text.load(name) for name in tasks}
  if data_config.train_per_task or data_config.test_per_task:
    loaded = {name: text.subsample(t, data_config.train_per_task or None, data_config.test_per_task or None,
                                   seed=data_config.seed) for name, t in loaded.items()}
  num_classes = tuple(loaded[n].num_classes for n in tasks)

  def split(which: str):
    texts, labels, task_ids = [], [], []
    per_task = [(list(getattr(loaded[n], f"{which}_texts")), np.asarray(getattr(loaded[n], f"{which}_labels")))
                for n in tasks]
    rng = np.random.default_rng(data_config.seed)
    orders = [rng.permutation(len(t)) for t, _ in per_task]
    # Round-robin over tasks, so every prefix of the split (an evaluated subset, a diagnostics chunk) mixes them.
    longest = max(len(o) for o in orders)
    for i in range(longest):
      for t, ((ts, ls), order) in enumerate(zip(per_task, orders)):
        if i < len(order):
          texts.append(ts[order[i]]); labels.append(int(ls[order[i]])); task_ids.append(t)
    tokens = minilm.tokenize(tokenizer, texts, max_length=data_config.max_length, padding="max_length")
    n = len(texts)
    y = np.stack([np.asarray(labels, np.int32), np.asarray(task_ids, np.int32), np.ones(n, np.int32)], 1)
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "task": np.asarray(task_ids, np.int32), "y": y}

  counts = {n: {"train": len(loaded[n].train_texts), "test": len(loaded[n].test_texts)} for n in tasks}
  return Corpus(tasks, num_classes, split("train"), split("test"), counts)


# ------------------------------------------------------------------------------------------- memory


def estimate_bytes(config, num_tasks: int) -> int:
  """Peak bytes of one method's fit: the frozen params, the vmapped adapter state, and the activations kept
  for the backward pass of one batch per seed (float32 unless the backbone computes in bfloat16)."""
  m, d = config.model, config.data
  layers = m.num_layers
  h, f, heads = 384, 1536, 12
  act_bytes = 2 if m.dtype == "bfloat16" else 4
  tokens = config.optim.batch_size * d.max_length
  per_layer = tokens * (10 * h + 3 * f) + config.optim.batch_size * heads * d.max_length ** 2 * 3
  activations = config.num_seeds * layers * per_layer * act_bytes
  eval_acts = config.num_seeds * config.optim.eval_batch_size * d.max_length * (4 * h + f) * act_bytes * 2
  adapter = config.num_seeds * 4 * 36 * 6912 * max(m.rank, 8) * 4                  # params + Adam moments + grads
  return int(minilm.param_bytes(layers) * 2 + activations * 2 + eval_acts + adapter)


# ------------------------------------------------------------------------------------------- validation


def validate(config) -> None:
  """Every config error before any data is read or anything is written."""
  names = configlib.split_names(config.method_names)
  unknown = [n for n in names if n not in METHODS]
  if unknown or not names:
    raise ValueError(f"config.method_names={names}: unknown {unknown}; valid: {list(METHODS)}.")
  tasks = config.data.tasks.split(",")
  bad = [t for t in tasks if t not in text.TASKS]
  if bad or len(set(tasks)) != len(tasks):
    raise ValueError(f"config.data.tasks={config.data.tasks!r}: use distinct names among {text.TASKS}.")
  m = config.model
  if not 1 <= m.num_layers <= 6:
    raise ValueError(f"config.model.num_layers={m.num_layers} must lie in 1..6 (MiniLM-L6 has 6 layers).")
  if m.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype={m.dtype!r}: use 'float32' or 'bfloat16'.")
  for name in names:
    spec = adapter_spec(name, m, len(tasks))
    if spec is not None and spec["rank"] < 1:
      raise ValueError(f"config.model.rank={m.rank} is too small for {name} at parity (rank {spec['rank']} per "
                       f"expert/cell): use a rank divisible by grid*num_experts={m.grid * m.num_experts} and by "
                       f"the number of tasks ({len(tasks)}).")
    for field, divisor in (("rank", m.grid), ("rank", m.grid * m.num_experts), ("rank", len(tasks))):
      if m.rank % divisor:
        raise ValueError(f"config.model.rank={m.rank} is not divisible by {divisor}: parity needs rank divisible by "
                         f"grid={m.grid}, grid*num_experts={m.grid * m.num_experts} and the task count "
                         f"{len(tasks)}.")
  if not 8 <= config.data.max_length <= minilm.MAX_LENGTH:
    raise ValueError(f"config.data.max_length={config.data.max_length} must lie in 8..{minilm.MAX_LENGTH}.")
  if config.num_seeds < 1:
    raise ValueError(f"config.num_seeds={config.num_seeds} must be >= 1.")
  for field in ("load_balance", "z_loss"):
    if not config.router[field] >= 0:
      raise ValueError(f"config.router.{field}={config.router[field]} must be >= 0 (0 turns it off).")
  train.check_memory(estimate_bytes(config, len(tasks)),
                     f"one method (num_seeds={config.num_seeds} x batch {config.optim.batch_size} x "
                     f"{config.data.max_length} tokens x {config.model.num_layers} layers)",
                     "lower config.num_seeds, config.optim.batch_size or config.data.max_length")


# ------------------------------------------------------------------------------------------- one method


def build_task(method: str, config, backbone: bert.Bert, frozen_example, corpus: Corpus):
  """(train.Task, adapted model or None, adapter param count, head param count) of one method."""
  tasks, num_classes = corpus.tasks, corpus.num_classes
  model = MultiTaskClassifier(backbone, num_classes)
  example = {k: jnp.asarray(v[:1]) for k, v in corpus.train.items() if k != "y"}
  args = (example["input_ids"], example["attention_mask"], example["task"])
  spec = adapter_spec(method, config.model, len(tasks))
  heads = sum(np.size(l) for l in jax.tree_util.tree_leaves(head_init(jax.random.PRNGKey(0), num_classes, 384)))
  weights = config.router
  routed = method in ROUTED

  if spec is None:
    def init(key, frozen):
      return {"extras": head_init(jax.random.fold_in(key, 7), num_classes, 384)}

    def predict(p, frozen, inputs):                     # only the heads are differentiated (p)
      return model.apply({"params": {**frozen, **p["extras"]}}, inputs["input_ids"], inputs["attention_mask"],
                         inputs["task"])
    adapted, count = None, 0
    aux_names = ()
  else:
    adapted, _ = inject.inject(model, frozen_example, spec, *args, target_modules=BACKBONE_PREFIX + bert.ADAPTER_TARGETS,
                               key=jax.random.PRNGKey(0), trainable_extras=r"head_\d+")
    count = adapted.num_params()

    def init(key, frozen):
      trainable = adapted.init_adapter(key, frozen)
      trainable["extras"] = head_init(jax.random.fold_in(key, 7), num_classes, 384)
      return trainable

    def predict(p, frozen, inputs):
      logits, traces = adapted.apply(frozen, p, inputs["input_ids"], inputs["attention_mask"], inputs["task"],
                                     context=inputs["task"], capture_routing=True)
      if not routed:
        return logits
      losses = inject.router_losses(traces, load_balance=weights.load_balance, z_loss=weights.z_loss,
                                    mask=inputs["attention_mask"])
      return logits, {"aux_loss": losses["aux_loss"], "load_balance": losses["load_balance"],
                      "router_z": losses["router_z"]}
    aux_names = ("load_balance", "router_z") if routed else ()

  def loss(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, :1], axis=-1)[:, 0]   # [B]

  task = train.Task(init=init, predict=predict, loss=loss,
               metric_names=metric_names(tasks, num_classes), per_example_metrics=per_example_metrics(num_classes),
               aux_names=aux_names)
  return task, adapted, count, heads


def routing_usage(adapted, params, frozen, split: dict, num_tasks: int, chunk: int) -> dict[str, np.ndarray]:
  """Expert usage [entries, layers, tasks, routers, E] and entropy on a whole split, for the final params."""
  @jax.jit
  def one_chunk(p, rows):
    _, traces = adapted.apply(frozen, p, rows["input_ids"], rows["attention_mask"], rows["task"],
                              context=rows["task"], capture_routing=True)
    diag = inject.routing_diagnostics(traces, groups=rows["task"], num_groups=num_tasks, mask=rows["attention_mask"])
    counts = jax.nn.one_hot(rows["task"], num_tasks).sum(0)                          # [tasks]
    return diag["usage"] * counts[None, :, None, None], diag["entropy"] * counts[None, :, None], counts

  n = split["task"].shape[0]
  usage = entropy = counts = 0.0
  for start in range(0, n, chunk):
    rows = {k: jnp.asarray(split[k][start:start + chunk]) for k in ("input_ids", "attention_mask", "task")}
    u, e, c = jax.vmap(one_chunk, in_axes=(0, None))(params, rows)
    usage, entropy, counts = usage + np.asarray(u), entropy + np.asarray(e), counts + np.asarray(c)
  counts = np.maximum(counts, 1)
  return {"usage": usage / counts[:, None, :, None, None], "entropy": entropy / counts[:, None, :, None]}


def task_separation(usage: np.ndarray) -> dict[str, float]:
  """How differently the tasks use the experts: the total-variation distance between two tasks' mean gates,
  averaged over task pairs, routers (cells) and layers; 0 = every task routed alike, 1 = disjoint experts.

  usage: [entries, layers, tasks, routers, E]. Returns the mean and std over entries (seeds).
  """
  tasks = usage.shape[2]
  pairs = [(a, b) for a in range(tasks) for b in range(a + 1, tasks)]
  tv = np.stack([0.5 * np.abs(usage[:, :, a] - usage[:, :, b]).sum(-1) for a, b in pairs], 0)   # [pairs, n, L, R]
  per_entry = tv.mean(axis=(0, 2, 3))
  return {"mean": float(per_entry.mean()), "std": float(per_entry.std())}


def step_time(task: train.Task, fit_params, frozen, batch: dict, settings: train.Settings, repeats: int = 5) -> float:
  """Median seconds of one vmapped training step (all seeds), the trainer's own `train_step`, compiled."""
  tx = train.make_optimizer()
  state = jax.vmap(lambda p: train.entry_state(p, tx.init(p)))(fit_params)
  inputs = {k: jnp.asarray(v) for k, v in batch.items() if k != "y"}
  y, mask = jnp.asarray(batch["y"]), jnp.ones(batch["y"].shape[0])
  step = jax.jit(jax.vmap(functools.partial(train.train_step, task, tx), in_axes=(0, None, None, None, None, None)))
  out = step(state, frozen, inputs, y, mask, jnp.asarray(0))
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(state, frozen, inputs, y, mask, jnp.asarray(0)))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


# ------------------------------------------------------------------------------------------- the run


def run(config, workdir: str) -> dict:
  validate(config)
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
  backbone, backbone_params, tokenizer = minilm.load(num_layers=config.model.num_layers, dtype=dtype)
  settings = train.Settings.from_config(config.optim)
  corpus = load_corpus(config.data, tokenizer)
  tasks = corpus.tasks
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  head_example = head_init(jax.random.PRNGKey(0), corpus.num_classes, 384)
  frozen = {"backbone": backbone_params, **head_example}
  data = train.Data(train=corpus.train, test=corpus.test, frozen=frozen)
  n_train = corpus.train["task"].shape[0]
  sizes = ", ".join(f"{t} {corpus.counts[t]['train']}/{corpus.counts[t]['test']}" for t in tasks)
  print(f"== multi-task text: {len(tasks)} tasks ({sizes}"
        f" train/test), {n_train} training examples, {config.data.max_length} tokens, MiniLM x{config.model.num_layers}"
        f" layers ({config.model.dtype}), {len(seeds)} seeds, {settings.epochs} evaluations x "
        f"{settings.steps(n_train)} steps of {settings.batch_size}", flush=True)
  print(f"   memory estimate {estimate_bytes(config, len(tasks)) / 2**30:.1f} GiB per method", flush=True)

  summaries, fits, usage, step_s = {}, {}, {}, {}
  batch = {k: v[:settings.batch_size] for k, v in corpus.train.items()}
  failed = []
  for method in configlib.split_names(config.method_names):
    task, adapted, count, heads = build_task(method, config, backbone, frozen, corpus)
    print(f"[{method}] {count:,} adapter parameters + {heads:,} head parameters", flush=True)
    try:
      fit = train.fit(task, data, seeds, settings, name=method, log=_trainer_log(method),
                      checkpoints=checkpoint.policy(config, workdir, method),
                      on_epoch_end=_progress(method, corpus, settings, time.perf_counter()))
    except RuntimeError as error:                         # one method's failure does not lose the others
      print(f"  [{method}] FAILED: {error}", flush=True)
      failed.append(method)
      summaries[method] = {"status": f"failed: {error}", "params": count + heads, "adapter_params": count,
                           "head_params": heads, "seeds": seeds}
      continue
    fits[method] = fit
    step_s[method] = (step_time(task, fit.params, frozen, batch, settings, config.eval.step_time_repeats)
                      if config.eval.step_time_repeats else float("nan"))
    final = task_scores(fit.history[:, -1, -1], tasks, corpus.num_classes)               # test split
    # The fit's metrics are per-task counts: the summary is over the accuracies and F1 derived from them.
    summaries[method] = results.method_summary(count + heads, seeds, fit, splits=(), extra={
        "test_accuracy": final["accuracy/mean"], "test_macro_f1": final["macro_f1/mean"]})
    summaries[method].pop("paper")
    summaries[method].update(
        adapter_params=count, head_params=heads, step_time_s=step_s[method],
        **{k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": [float(a) for a in v]}
           for k, v in final.items()})
    if adapted is not None and method in ROUTED:
      usage[method] = routing_usage(adapted, fit.params, frozen, corpus.test, len(tasks), settings.eval_batch_size)
      usage[method]["paths"] = adapted.paths
      summaries[method]["routing_entropy_nats"] = float(np.mean(usage[method]["entropy"]))
      summaries[method]["task_separation"] = task_separation(usage[method]["usage"])
    print(f"  [{method}] test accuracy {summaries[method]['accuracy/mean']['mean'] * 100:.2f} "
          f"+- {summaries[method]['accuracy/mean']['std'] * 100:.2f}, macro-F1 "
          f"{summaries[method]['macro_f1/mean']['mean'] * 100:.2f}; step {step_s[method] * 1e3:.0f} ms; "
          f"{fit.wall_time_s:.0f} s", flush=True)

  if "lora" in step_s:
    for method in step_s:
      summaries[method]["step_time_vs_lora"] = step_s[method] / step_s["lora"]
  markdown = _markdown(config, corpus, summaries, time.perf_counter() - start)
  results.atomic_write_text(os.path.join(workdir, "results.md"), markdown)
  results.write_json(os.path.join(workdir, "results.json"), {
      "experiment": "multitask_text", "config": config.to_dict(), "tasks": list(tasks),
      "counts": corpus.counts, "methods": summaries, "wall_time_s": time.perf_counter() - start})
  _write_history(os.path.join(workdir, "history.csv"), fits, corpus)
  _figures(workdir, fits, usage, corpus, settings)
  print(markdown, flush=True)
  print(f"wrote {workdir}/results.json, results.md, history.csv, accuracy.png, routing_*.png "
        f"({time.perf_counter() - start:.0f} s total)", flush=True)
  if failed:
    raise results.RunFailed(f"methods failed: {failed} (see results.json); the others are written.")
  return summaries


def _trainer_log(method: str):
  """The trainer's own lines (resume, divergence), without its per-epoch metric line: `_progress` prints a
  readable one (the raw metrics are 98 counts per split)."""
  prefix = f"  [{method}] epoch "
  return lambda line: None if line.startswith(prefix) else print(line, flush=True)


def _progress(method: str, corpus: Corpus, settings: train.Settings, start: float):
  """An epoch hook printing one line: test accuracy per task and their mean (over seeds), elapsed time."""
  def hook(fit_state: train.FitState) -> None:
    e = fit_state.epoch - 1
    scores = task_scores(fit_state.history[:, e, -1], corpus.tasks, corpus.num_classes)
    train_acc = task_scores(fit_state.history[:, e, 0], corpus.tasks, corpus.num_classes)["accuracy/mean"]
    loss = np.nanmean(fit_state.train_history[:, e, 0]) if fit_state.train_history is not None else float("nan")
    per_task = "  ".join(f"{t} {np.nanmean(scores[f'accuracy/{t}']) * 100:5.1f}" for t in corpus.tasks)
    print(f"  [{method}] eval {fit_state.epoch:>2}/{settings.epochs}  loss {loss:.3f}  train acc "
          f"{np.nanmean(train_acc) * 100:5.1f}  test acc {per_task}  mean {np.nanmean(scores['accuracy/mean']) * 100:5.1f}"
          f"  ({time.perf_counter() - start:.0f}s)", flush=True)
  return hook


def _pm(entry, scale=100.0):
  return f"{entry['mean'] * scale:.2f} ± {entry['std'] * scale:.2f}"


def _markdown(config, corpus: Corpus, summaries: dict, wall: float) -> str:
  tasks = corpus.tasks
  lines = [f"# Multi-task text stream on MiniLM-L6 ({config.model.num_layers} layers, frozen)", "",
           "Tasks (train / test examples): " + ", ".join(f"{t} {corpus.counts[t]['train']:,} / "
                                                          f"{corpus.counts[t]['test']:,}" for t in tasks)
           + f". {config.data.max_length} tokens at most, {config.num_seeds} seeds, batch "
           f"{config.optim.batch_size}, {config.optim.epochs} x {config.optim.steps_per_epoch or 'one pass'} steps, "
           f"lr {config.optim.lr}. Adapters on q, k, v, attention output and both FFN projections of every layer; "
           f"router losses: load balance {config.router.load_balance}, z {config.router.z_loss}.", "",
           "Test accuracy % per task, mean over tasks, and macro-F1 % (mean ± std over seeds):", "",
           "| Method | Adapter params | " + " | ".join(tasks) + " | mean acc | mean macro-F1 | step (ms) | vs LoRA |",
           "|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
  for method, s in summaries.items():
    if "accuracy/mean" not in s:
      lines.append(f"| {LABELS[method]} | {s['adapter_params']:,} | " + " | ".join("-" for _ in tasks)
                   + f" | {s['status']} | | | |")
      continue
    cells = [_pm(s[f"accuracy/{t}"]) for t in tasks]
    ratio, step = s.get("step_time_vs_lora", float("nan")), s["step_time_s"]
    lines.append(f"| {LABELS[method]} | {s['adapter_params']:,} | " + " | ".join(cells)
                 + f" | {_pm(s['accuracy/mean'])} | {_pm(s['macro_f1/mean'])} | "
                 + (f"{step * 1e3:.0f} | {ratio:.2f}x" if np.isfinite(step) and np.isfinite(ratio) else "- | -") + " |")
  lines += ["", "Macro-F1 % per task:", "", "| Method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
  for method, s in summaries.items():
    if "macro_f1/mean" in s:
      lines.append(f"| {LABELS[method]} | " + " | ".join(_pm(s[f"macro_f1/{t}"]) for t in tasks) + " |")
  routed = [(m, s) for m, s in summaries.items() if "task_separation" in s]
  if routed:
    lines += ["", "Routing on the test set (seed mean): gate entropy per token in nats (uniform over E = "
              f"{np.log(config.model.num_experts):.3f}), and task separation, the total-variation distance between "
              "two tasks' mean gates averaged over task pairs, cells and layers (0: all tasks routed alike, 1: "
              "disjoint experts):", ""]
    lines += [f"- {LABELS[m]}: entropy {s['routing_entropy_nats']:.3f}, task separation "
              f"{s['task_separation']['mean']:.3f} ± {s['task_separation']['std']:.3f}" for m, s in routed]
  heads = next(iter(summaries.values()))["head_params"]
  lines += ["", f"Every method also trains {heads:,} head parameters (one linear head per task). Step time: one "
            f"vmapped training step of all seeds, median of {config.eval.step_time_repeats}, on this machine. "
            f"Run time {wall:.0f} s."]
  return "\n".join(lines) + "\n"


def _write_history(path: str, fits: dict, corpus: Corpus) -> None:
  rows = ["method,seed,evaluation,split,metric,value"]
  for method, fit in fits.items():
    for k, split in enumerate(fit.splits):
      scores = task_scores(fit.history[:, :, k], corpus.tasks, corpus.num_classes)      # {name: [seeds, evals]}
      for name, values in scores.items():
        for s in range(values.shape[0]):
          for e in range(values.shape[1]):
            rows.append(f"{method},{s},{e + 1},{split},{name},{values[s, e]:.6f}")
    for c, name in enumerate(fit.train_names):
      for s in range(fit.train_history.shape[0]):
        for e in range(fit.train_history.shape[1]):
          rows.append(f"{method},{s},{e + 1},train_stream,{name},{fit.train_history[s, e, c]:.6f}")
  results.atomic_write_text(path, "\n".join(rows) + "\n")


def _figures(workdir: str, fits: dict, usage: dict, corpus: Corpus, settings: train.Settings) -> None:
  if fits:
    curves = {m: task_scores(f.history[:, :, -1], corpus.tasks, corpus.num_classes)["accuracy/mean"]
              for m, f in fits.items()}
    plots.curves_with_bands(os.path.join(workdir, "accuracy.png"), curves, labels=LABELS,
                            title="mean test accuracy over tasks", xlabel=f"evaluation (every "
                            f"{settings.steps_per_epoch or 'pass'} steps)", ylabel="test accuracy (%)")
  for method, u in usage.items():
    names = [p.replace(BACKBONE_PREFIX + "encoder/layer_", "L").replace("/attention/self/", " ")
             .replace("/attention/output/dense", " attn out").replace("/intermediate/dense", " ffn in")
             .replace("/output/dense", " ffn out") for p in u["paths"]]
    plots.routing_heatmaps(os.path.join(workdir, f"routing_{method}.png"), u["usage"][0], corpus.tasks,
                           layer_names=names,
                           title=f"{LABELS[method]}: expert usage per layer, cell and task (seed 0, test set)")
