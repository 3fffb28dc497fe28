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
LoRA of rank r on every adapted layer (`config.model`):

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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from localmoe import adapters, checkpoint, configlib, inject, plots, results, routing, runner, train
from localmoe.train import optimizer, probe
from localmoe.train.probe import PROBE_TOLERANCE, fit_logistic  # noqa: F401  (the probe's solver)
from localmoe.data import text
from localmoe.models import bert, minilm

METHODS = ("heads_only", "linear_probe", "lora", "localized_lora", "blockwise_moe", "cellwise_moe",
           "blockwise_moe_anchor", "cellwise_moe_anchor", "cellwise_moe_oracle", "cellwise_moe_activation",
           "per_task_lora")
LABELS = {"heads_only": "Frozen backbone, heads only", "linear_probe": "Linear probe (converged)",
          "lora": "LoRA", "localized_lora": "Localized LoRA",
          "blockwise_moe": "Block-wise LoRA-MoE (task id)", "cellwise_moe": "Cell-wise LoRA-MoE (task id)",
          "blockwise_moe_anchor": "Block-wise LoRA-MoE (task id, anchors' router)",
          "cellwise_moe_anchor": "Cell-wise LoRA-MoE (task id, anchors' router)",
          "cellwise_moe_oracle": "Cell-wise LoRA-MoE (task id, task-aligned start)",
          "cellwise_moe_activation": "Cell-wise LoRA-MoE (activations, no id)",
          "per_task_lora": "One LoRA per task (hard routing)"}
ROUTED = ("blockwise_moe", "cellwise_moe", "blockwise_moe_anchor", "cellwise_moe_anchor", "cellwise_moe_oracle",
          "cellwise_moe_activation")
ANCHORED = ("blockwise_moe_anchor", "cellwise_moe_anchor", "cellwise_moe_oracle")   # router group x lr_mult
NEG = -1e9                                        # logit of a class the example's task does not have
HIDDEN = 384                                      # MiniLM-L6's width
ROUTER_PATTERN = r"adapter/.*/router/.*"          # the routers' params in the trainable tree


# ------------------------------------------------------------------------------------------- adapters


def adapter_spec(method: str, model_config, router_config, num_tasks: int) -> dict | None:
  """The adapter spec of `method` at parity with LoRA of rank r (None: no adapter)."""
  r, k, e = model_config.rank, model_config.grid, model_config.num_experts
  common = {"alpha": float(model_config.alpha) if model_config.alpha else None}
  grid = {"k_y": k, "k_x": k}
  if method in ("heads_only", "linear_probe"):
    return None
  if method == "lora":
    return {"method": "lora", "rank": r, **common}
  if method == "localized_lora":
    return {"method": "localized_lora", "rank": r // k, **grid, **common}
  if method in ROUTED:
    spec = {"method": "cellwise_moe" if method.startswith("cellwise") else "blockwise_moe",
            "rank": r // (k * e), "num_experts": e, **grid, **common}
    if method == "cellwise_moe_activation":
      return {**spec, "router_input": "activation"}
    spec.update(router_input="context", context_dim=num_tasks)
    if method.endswith("_anchor"):
      spec.update(router_init="uniform", router_init_scale=float(router_config.anchor_init_scale))
    if method == "cellwise_moe_oracle":
      spec.update(router_init="task_aligned", router_init_margin=float(router_config.oracle_margin))
    return spec
  if method == "per_task_lora":
    return {"method": "per_task_lora", "rank": r // num_tasks, "context_dim": num_tasks, **common}
  raise ValueError(f"config.method_names: {method!r} is not a method of this experiment; valid: {METHODS}.")


ANCHOR_RULE_NOTE = (f"the _anchor and _oracle methods add their own rule 'router' (pattern {ROUTER_PATTERN!r}, "
                    "config.router.anchor_lr_mult and anchor_weight_decay) before the config's rules")


def method_groups(method: str, config) -> list:
  """config.optim.groups of `method`: the anchors' router group first (for ANCHORED), then the config's. A
  config rule named "router" clashes with the anchors' own for ANCHORED: a ValueError saying so."""
  groups = [dataclasses.asdict(rule) for rule in train.parse_groups(config.optim.groups)]
  if method in ANCHORED:
    if any(rule["name"] == "router" for rule in groups):
      raise ValueError(f"config.optim.groups={config.optim.groups!r} has a rule named 'router', as has method "
                       f"{method}: {ANCHOR_RULE_NOTE}. Set the routers' rate with config.router.anchor_lr_mult "
                       "(drop poly_router), or give your rule another name.")
    groups = [dict(name="router", pattern=ROUTER_PATTERN, lr_mult=float(config.router.anchor_lr_mult),
                   weight_decay=float(config.router.anchor_weight_decay))] + groups
  return groups


_SHAPES: dict[str, dict] = {}                     # trainable_shapes' results by what they depend on


def trainable_shapes(method: str, config, num_tasks: int) -> dict | None:
  """The shapes (`jax.ShapeDtypeStruct`) of one entry's trainable params of `method` ({"adapter": ...,
  "extras": {"head_<t>": ...}}), built as `build_task` builds them but on abstract backbone weights: no
  weight is read and nothing is computed. None for the linear probe (not trained by the trainer). Task heads
  are given two classes each: the paths, which is what parameter groups match, do not depend on it."""
  if method == "linear_probe":
    return None
  m = config.model
  key = json.dumps([method, adapter_spec(method, m, config.router, num_tasks), m.num_layers, m.frozen_layers,
                    num_tasks, m.heads], sort_keys=True)
  if key not in _SHAPES:
    upper = bert.Upper(bert.Bert(num_layers=m.num_layers), m.frozen_layers)
    classes = (2,) * num_tasks
    rows = {"hidden": np.zeros((1, 8, HIDDEN), np.float32), "attention_mask": np.ones((1, 8), np.int32),
            "task": np.zeros((1,), np.int32), "y": np.zeros((1, 3), np.int32)}
    corpus = Corpus(tuple(f"task{t}" for t in range(num_tasks)), classes, rows, rows, rows, {})
    model = MultiTaskClassifier(upper, classes)
    frozen = jax.eval_shape(lambda k: model.init(k, rows["hidden"], rows["attention_mask"], rows["task"]),
                            jax.random.PRNGKey(0))["params"]

    def init(frozen):
      heads0 = {name: value for name, value in frozen.items() if name != "backbone"}
      task = build_task(method, config, upper, frozen, corpus, heads0)[0]
      return task.init(jax.random.PRNGKey(0), frozen)

    _SHAPES[key] = jax.eval_shape(init, frozen)
  return _SHAPES[key]


def check_method_groups(config, names: Sequence[str], settings: train.Settings, num_tasks: int) -> None:
  """Every method's parameter groups resolved against its own trainable params (`optimizer.group_sizes`:
  a rule matching nothing, a shadowed rule, everything frozen), before any data is read: one ValueError."""
  for name in names:
    rules = train.parse_groups(method_groups(name, config))
    shapes = trainable_shapes(name, config, num_tasks) if rules else None
    if shapes is None:
      continue
    added = {"router": f"method {name} adds before the config's rules (config.router.anchor_lr_mult, "
                       "anchor_weight_decay)"} if name in ANCHORED else None
    optimizer.group_sizes(dataclasses.replace(settings, groups=rules), shapes, where=f" (method {name})",
                          added=added)


# ------------------------------------------------------------------------------------------- model


class MultiTaskClassifier(nn.Module):
  """Upper layers -> mean pool over real tokens -> the example's task head. Logits [B, max classes]; the
  classes a task does not have get a large negative logit."""
  backbone: bert.Upper
  num_classes: tuple[int, ...]                    # classes per task

  @nn.compact
  def __call__(self, hidden, attention_mask, task):
    hidden = self.backbone(hidden, attention_mask)                                    # [B, T, H]
    pooled = bert.mean_pool(hidden, attention_mask).astype(jnp.float32)               # [B, H]
    width = max(self.num_classes)
    logits = jnp.stack([nn.Dense(width, name=f"head_{t}")(pooled) for t in range(len(self.num_classes))], 1)
    logits = jnp.take_along_axis(logits, task[:, None, None], axis=1)[:, 0]          # [B, width]
    valid = jnp.arange(width)[None, :] < jnp.asarray(self.num_classes)[task][:, None]
    return jnp.where(valid, logits, NEG)


BACKBONE_PREFIX = "backbone/"


def random_heads(key, num_classes: Sequence[int], hidden: int = HIDDEN) -> dict:
  """Fresh task heads: N(0, 0.02^2) kernels, zero biases (BERT's classifier init)."""
  width = max(num_classes)
  keys = jax.random.split(key, len(num_classes))
  return {f"head_{t}": {"kernel": 0.02 * jax.random.normal(keys[t], (hidden, width)),
                        "bias": jnp.zeros((width,))} for t in range(len(num_classes))}


# ------------------------------------------------------------------------------------------- linear probe


def probe_heads(pooled: dict, corpus: "Corpus", l2_grid: Sequence[float], max_steps: int, log=print):
  """The converged linear probe per task (`train.probe.select_l2`: L2 chosen on the held-out rows, refitted on
  the training rows). Returns (heads {"head_<t>": {"kernel" [H, width], "bias" [width]}} with zero columns for
  the classes a task lacks, {task: info})."""
  width = max(corpus.num_classes)
  heads, info = {}, {}
  for t, (name, classes) in enumerate(zip(corpus.tasks, corpus.num_classes)):
    rows = {split: getattr(corpus, split)["task"] == t for split in ("train", "val")}
    x = {split: jnp.asarray(pooled[split][rows[split]]) for split in rows}
    y = {split: jnp.asarray(getattr(corpus, split)["y"][rows[split], 0]) for split in rows}
    p, info[name] = probe.select_l2(x["train"], y["train"], x["val"], y["val"], l2_grid, classes, max_steps)
    heads[f"head_{t}"] = {"kernel": jnp.zeros((HIDDEN, width)).at[:, :classes].set(p["kernel"]),
                          "bias": jnp.zeros((width,)).at[:classes].set(p["bias"])}
    if log:
      i = info[name]
      log(f"  [linear_probe] {name}: L2 {i['l2']:g} (held-out accuracy "
          + ", ".join(f"{l:g}: {s * 100:.1f}" for l, s in zip(l2_grid, i["val_accuracy"]))
          + f"); {i['iterations']} L-BFGS steps, gradient norm {i['grad_norm']:.1e}")
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
  val: dict                                       # held-out training rows, same keys
  test: dict
  counts: dict                                    # per task: train / val / test sizes


def _subsets(data_config, tasks: Sequence[str]) -> dict:
  """{task: TextTask} with the config's stratified subsets; a size the task cannot give is one error naming
  the field, the task and the valid range."""
  loaded = {name: text.load(name) for name in tasks}
  out = {}
  for name, t in loaded.items():
    train_n, test_n = len(t.train_texts), len(t.test_texts)
    for field, value, available in (("train_per_task", data_config.train_per_task, train_n),
                                    ("test_per_task", data_config.test_per_task, test_n)):
      if value > available:
        raise ValueError(f"config.data.{field}={value} is more than task {name!r} has ({available} "
                         f"{field.split('_')[0]} rows): use at most {available}, or 0 for all of them.")
    want_train = data_config.train_per_task or None
    want_test = data_config.test_per_task or None
    out[name] = text.subsample(t, want_train, want_test, seed=data_config.seed) if (want_train or want_test) else t
    kept = len(out[name].train_texts)
    if data_config.val_per_task >= kept:
      raise ValueError(f"config.data.val_per_task={data_config.val_per_task} leaves no training rows of task "
                       f"{name!r} ({kept} in all): use at most {kept - 1}.")
  return out


def load_corpus(data_config, tokenizer, loaded: dict | None = None) -> Corpus:
  """Tokenised stream, held-out rows and test set, each interleaved round-robin over the tasks: any prefix of
  a split is a fixed, task-balanced subset (the trainer evaluates the first `config.optim.eval_train_rows`
  training rows; the router diagnostics read the first `eval.diagnostic_rows` test rows). The held-out rows
  are a random `val_per_task` of each task's training rows. y [N, 3] = label, task, counted (all 1)."""
  tasks = tuple(configlib.split_names(data_config.tasks))
  loaded = loaded if loaded is not None else _subsets(data_config, tasks)
  num_classes = tuple(loaded[n].num_classes for n in tasks)
  rng = np.random.default_rng(data_config.seed)
  held = {n: set(rng.permutation(len(loaded[n].train_texts))[:data_config.val_per_task].tolist()) for n in tasks}

  def split(which: str, pick=None):
    texts, labels, task_ids = [], [], []
    per_task = []
    for n in tasks:
      source = "test" if which == "test" else "train"
      ts, ls = list(getattr(loaded[n], f"{source}_texts")), np.asarray(getattr(loaded[n], f"{source}_labels"))
      keep = [i for i in range(len(ts)) if pick is None or pick(n, i)]
      per_task.append(([ts[i] for i in keep], ls[keep]))
    orders = [rng.permutation(len(t)) for t, _ in per_task]
    # Round-robin over tasks, so every prefix of the split (an evaluated subset, a diagnostics chunk) mixes them.
    for i in range(max(len(o) for o in orders)):
      for t, ((ts, ls), order) in enumerate(zip(per_task, orders)):
        if i < len(order):
          texts.append(ts[order[i]])
          labels.append(int(ls[order[i]]))
          task_ids.append(t)
    tokens = minilm.tokenize(tokenizer, texts, max_length=data_config.max_length, padding="max_length")
    y = np.stack([np.asarray(labels, np.int32), np.asarray(task_ids, np.int32), np.ones(len(texts), np.int32)], 1)
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "task": np.asarray(task_ids, np.int32), "y": y}

  train_split = split("train", lambda n, i: i not in held[n])
  val_split = split("val", lambda n, i: i in held[n])
  test_split = split("test")
  counts = {n: {"train": len(loaded[n].train_texts) - len(held[n]), "val": len(held[n]),
                "test": len(loaded[n].test_texts)} for n in tasks}
  return Corpus(tasks, num_classes, train_split, val_split, test_split, counts)


def lower_features(backbone: bert.Bert, params, split: dict, layers: int, chunk: int = 256) -> dict:
  """The split with input_ids replaced by the hidden states after the lower `layers` (computed once):
  {"hidden" [N, T, H] (the backbone's compute dtype), "attention_mask", "task", "y"}."""
  fn = jax.jit(lambda ids, mask: bert.hidden_after(backbone, params, ids, mask, layers))
  ids, mask = split["input_ids"], split["attention_mask"]
  hidden = _in_chunks(fn, (ids, mask), chunk)
  return {"hidden": hidden, "attention_mask": mask, "task": split["task"], "y": split["y"]}


def _in_chunks(fn, arrays, chunk: int) -> np.ndarray:
  """fn over rows in chunks of `chunk` (the last one padded with repeated rows, so one shape compiles)."""
  n = len(arrays[0])
  out = []
  for s in range(0, n, chunk):
    index = np.minimum(np.arange(s, s + chunk), n - 1)
    out.append(np.asarray(fn(*(a[index] for a in arrays)))[:min(chunk, n - s)])
  return np.concatenate(out)


def pooled_features(upper: bert.Upper, params, split: dict, chunk: int = 256) -> np.ndarray:
  """Mean-pooled output of the frozen upper layers (no adapter): [N, H] float32, the probe's features."""
  fn = jax.jit(lambda h, m: bert.mean_pool(upper.apply({"params": params}, h, m), m).astype(jnp.float32))
  return _in_chunks(fn, (split["hidden"], split["attention_mask"]), chunk)


# ------------------------------------------------------------------------------------------- memory


def estimate_bytes(config, num_tasks: int, rows: int) -> int:
  """Peak bytes of one method's fit: the frozen params, the cached hidden states of `rows` examples, the
  vmapped adapter state, and the activations kept for the backward pass of one batch per seed (float32
  unless the backbone computes in bfloat16)."""
  m, d = config.model, config.data
  layers = m.num_layers - m.frozen_layers
  h, f, heads = HIDDEN, 1536, 12
  act_bytes = 2 if m.dtype == "bfloat16" else 4
  tokens = config.optim.batch_size * d.max_length
  per_layer = tokens * (10 * h + 3 * f) + config.optim.batch_size * heads * d.max_length ** 2 * 3
  activations = config.num_seeds * layers * per_layer * act_bytes
  eval_acts = config.num_seeds * config.optim.eval_batch_size * d.max_length * (4 * h + f) * act_bytes * 2
  cached = rows * d.max_length * h * act_bytes
  adapter = config.num_seeds * 4 * 6 * layers * 6912 * max(m.rank, 8) * 4       # params + Adam moments + grads
  return int(minilm.param_bytes(m.num_layers) * 2 + activations * 2 + eval_acts + adapter + 2 * cached)


# ------------------------------------------------------------------------------------------- validation


TARGET_SHAPES = ((HIDDEN, HIDDEN), (HIDDEN, 1536), (1536, HIDDEN))   # (d_in, d_out) of the adapted layers
FULL_TRAIN_ROWS, FULL_TEST_ROWS = 31_000, 12_300                     # upper bounds of all four tasks


def _positive_int(value, field: str, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{field}={value!r} must be a positive integer: {fix}.")


def _non_negative_int(value, field: str, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{field}={value!r} must be an integer >= 0: {fix}.")


def probe_grid(config) -> list[float]:
  try:
    grid = [float(v) for v in configlib.split_names(config.probe.l2)]
  except ValueError:
    grid = []
  if not grid or any(not (v > 0 and np.isfinite(v)) for v in grid):
    raise ValueError(f"config.probe.l2={config.probe.l2!r} must be a comma-separated list of L2 weights > 0, "
                     "e.g. '1e-4,1e-3,1e-2'.")
  return grid


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
  _positive_int(d.val_per_task, "config.data.val_per_task", "the held-out training rows per task (probe "
                "regularisation and curves), e.g. 100")
  if d.train_per_task and d.val_per_task >= d.train_per_task:
    raise ValueError(f"config.data.val_per_task={d.val_per_task} must be below config.data.train_per_task="
                     f"{d.train_per_task} (the held-out rows come out of the training rows).")
  if not isinstance(d.max_length, int) or not 8 <= d.max_length <= minilm.MAX_LENGTH:
    raise ValueError(f"config.data.max_length={d.max_length!r} must lie in 8..{minilm.MAX_LENGTH}.")
  if not isinstance(m.num_layers, int) or not 1 <= m.num_layers <= 6:
    raise ValueError(f"config.model.num_layers={m.num_layers!r} must lie in 1..6 (MiniLM-L6 has 6 layers).")
  if not isinstance(m.frozen_layers, int) or not 0 <= m.frozen_layers < m.num_layers:
    raise ValueError(f"config.model.frozen_layers={m.frozen_layers!r} must lie in 0..{m.num_layers - 1} (at "
                     "least one layer carries adapters).")
  if m.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.dtype={m.dtype!r}: use 'float32' or 'bfloat16'.")
  if m.heads not in ("probe", "random"):
    raise ValueError(f"config.model.heads={m.heads!r}: use 'probe' (heads start from the linear probe) or 'random'.")
  for field in ("rank", "grid", "num_experts"):
    _positive_int(m[field], f"config.model.{field}", {"rank": "e.g. 8", "grid": "K of a K x K grid, e.g. 2",
                                                      "num_experts": "experts per cell, e.g. 4"}[field])
  if isinstance(m.alpha, bool) or not isinstance(m.alpha, (int, float)) or not (m.alpha >= 0 and np.isfinite(m.alpha)):
    raise ValueError(f"config.model.alpha={m.alpha!r} must be >= 0 (0: alpha = rank, a scale of 1).")
  for name in names:
    spec = adapter_spec(name, m, config.router, len(tasks))
    if spec is None:
      continue
    if spec["rank"] < 1 or m.rank % (m.grid * m.num_experts) or m.rank % len(tasks) or m.rank % m.grid:
      raise ValueError(f"config.model.rank={m.rank} does not split at parity for {name} (rank "
                       f"{spec['rank']} per expert/cell): use a rank divisible by grid={m.grid}, grid*num_experts="
                       f"{m.grid * m.num_experts} and the number of tasks ({len(tasks)}).")
    for d_in, d_out in TARGET_SHAPES:
      try:
        adapters.make(spec, d_in=d_in, d_out=d_out)
      except ValueError as error:
        raise ValueError(f"config.model (method {name}, a {d_in} -> {d_out} layer): {error}") from None
  for field in ("load_balance", "z_loss", "anchor_weight_decay"):
    value = config.router[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
      raise ValueError(f"config.router.{field}={value!r} must be >= 0 (0 turns it off).")
  for field in ("anchor_lr_mult", "anchor_init_scale", "oracle_margin"):
    value = config.router[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and np.isfinite(value)):
      raise ValueError(f"config.router.{field}={value!r} must be a finite number > 0.")
  probe_grid(config)
  _positive_int(config.probe.max_steps, "config.probe.max_steps", "L-BFGS iterations at most, e.g. 2000")
  _positive_int(config.num_seeds, "config.num_seeds", "e.g. 3")
  _non_negative_int(config.seed, "config.seed", "e.g. 0")
  _non_negative_int(config.eval.step_time_repeats, "config.eval.step_time_repeats", "0 skips the step timing")
  _positive_int(config.eval.diagnostic_rows, "config.eval.diagnostic_rows", "e.g. 256")
  settings = train.Settings.from_config(config.optim)
  if config.eval.diagnostic_rows > settings.eval_batch_size:
    raise ValueError(f"config.eval.diagnostic_rows={config.eval.diagnostic_rows} must be <= "
                     f"config.optim.eval_batch_size={settings.eval_batch_size} (they are read from one chunk).")
  rows = ((d.train_per_task or FULL_TRAIN_ROWS // len(tasks)) + (d.test_per_task or FULL_TEST_ROWS // len(tasks)))
  train.check_memory(estimate_bytes(config, len(tasks), rows * len(tasks)),
                     f"one method (num_seeds={config.num_seeds} x batch {config.optim.batch_size} x "
                     f"{d.max_length} tokens x {m.num_layers - m.frozen_layers} adapted layers)",
                     "lower config.num_seeds, config.optim.batch_size or config.data.max_length")
  check_method_groups(config, names, settings, len(tasks))
  return settings


# ------------------------------------------------------------------------------------------- one method


def build_task(method: str, config, upper: bert.Upper, frozen_example, corpus: Corpus, heads0: dict):
  """(train.Task, adapted model or None, adapter param count, head param count) of one method.

  heads0: the heads every entry starts from (the probe's under LP-FT; else drawn per seed)."""
  tasks, num_classes = corpus.tasks, corpus.num_classes
  model = MultiTaskClassifier(upper, num_classes)
  example = {k: jnp.asarray(v[:1]) for k, v in corpus.train.items() if k != "y"}
  args = (example["hidden"], example["attention_mask"], example["task"])
  spec = adapter_spec(method, config.model, config.router, len(tasks))
  heads = sum(np.size(l) for l in jax.tree_util.tree_leaves(random_heads(jax.random.PRNGKey(0), num_classes)))
  weights = config.router
  routed = method in ROUTED
  diag_rows = config.eval.diagnostic_rows

  def start_heads(key):
    return heads0 if config.model.heads == "probe" else random_heads(jax.random.fold_in(key, 7), num_classes)

  if spec is None:
    def init(key, frozen):
      return {"extras": start_heads(key)}

    def predict(p, frozen, inputs):                     # only the heads are differentiated (p)
      return model.apply({"params": {**frozen, **p["extras"]}}, inputs["hidden"], inputs["attention_mask"],
                         inputs["task"])
    adapted, count, aux_names, diagnostics = None, 0, (), None
  else:
    adapted, _ = inject.inject(model, frozen_example, spec, *args, target_modules=BACKBONE_PREFIX + bert.ADAPTER_TARGETS,
                               key=jax.random.PRNGKey(0), trainable_extras=r"head_\d+")
    count = adapted.num_params()

    def init(key, frozen):
      trainable = adapted.init_adapter(key, frozen)
      trainable["extras"] = start_heads(key)
      return trainable

    def predict(p, frozen, inputs):
      logits, traces = adapted.apply(frozen, p, inputs["hidden"], inputs["attention_mask"], inputs["task"],
                                     context=inputs["task"], capture_routing=True)
      if not routed:
        return logits
      losses = inject.router_losses(traces, load_balance=weights.load_balance, z_loss=weights.z_loss,
                                    mask=inputs["attention_mask"])
      return logits, {"aux_loss": losses["aux_loss"], "load_balance": losses["load_balance"],
                      "router_z": losses["router_z"]}
    aux_names = ("load_balance", "router_z") if routed else ()
    diagnostics = (functools.partial(router_diagnostics, adapted, len(tasks), diag_rows) if routed else None)

  def loss(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, :1], axis=-1)[:, 0]   # [B]

  task = train.Task(init=init, predict=predict, loss=loss,
                    metric_names=metric_names(tasks, num_classes), per_example_metrics=per_example_metrics(num_classes),
                    aux_names=aux_names, diagnostics=diagnostics)
  return task, adapted, count, heads


def router_diagnostics(adapted, num_tasks: int, rows: int, params, frozen, inputs) -> dict:
  """Routing on the first `rows` test rows (round-robin over tasks): "usage" [layers, tasks, routers, E],
  "entropy_nats" [] (mean per-token gate entropy, averaged over layers, tasks and routers; log E = uniform)
  and "task_separation" [] (`routing.task_separation`, averaged over layers)."""
  rows = {k: v[:rows] for k, v in inputs.items()}
  _, traces = adapted.apply(frozen, params, rows["hidden"], rows["attention_mask"], rows["task"],
                            context=rows["task"], capture_routing=True)
  diag = inject.routing_diagnostics(traces, groups=rows["task"], num_groups=num_tasks, mask=rows["attention_mask"])
  return {"usage": diag["usage"], "entropy_nats": jnp.mean(diag["entropy"]),
          "task_separation": jnp.mean(routing.task_separation(diag["usage"]))}


def _per_seed(values: np.ndarray, ok: np.ndarray) -> dict:
  """{"mean", "std", "per_seed"} over the seeds that did not diverge (None where a seed diverged)."""
  values = np.asarray(values, np.float64)
  kept = values[ok]
  return {"mean": float(np.mean(kept)) if kept.size else None, "std": float(np.std(kept)) if kept.size else None,
          "per_seed": [float(v) if good else None for v, good in zip(values, ok)]}


def summarise(method: str, fit: train.FitResult, seeds, corpus: Corpus, count: int, heads: int) -> dict:
  """results.json entry of one trained method: accuracy / macro-F1 per task and their means over ok seeds,
  and for routed methods the router diagnostics at initialisation and at the end."""
  final = task_scores(fit.history[:, -1, -1], corpus.tasks, corpus.num_classes)            # test split
  summary = results.method_summary(count + heads, seeds, fit, splits=(), extra={
      "test_accuracy": final["accuracy/mean"], "test_macro_f1": final["macro_f1/mean"]})
  summary.pop("paper")
  ok = np.array([s == "ok" for s in fit.status])
  summary.update(adapter_params=count, head_params=heads, **{k: _per_seed(v, ok) for k, v in final.items()})
  if "entropy_nats" in fit.diagnostics:
    for key, name in (("entropy_nats", "routing_entropy"), ("task_separation", "task_separation")):
      final_v, init_v = fit.diagnostics[key][:, -1], fit.initial_diagnostics[key]
      suffix = "_nats" if key == "entropy_nats" else ""
      summary[f"{name}{suffix}"] = float(np.mean(final_v[ok])) if ok.any() else None
      summary[f"{name}_init{suffix}"] = float(np.mean(init_v))
      summary[f"{name}_per_seed"] = {"init": [float(v) for v in init_v],
                                     "final": [float(v) if good and np.isfinite(v) else None
                                               for v, good in zip(final_v, ok)]}
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
  return {"params": heads, "adapter_params": 0, "head_params": heads, "seeds": list(seeds), **flat, "status": "ok",
          "probe": info, **{k: _per_seed(v, ok) for k, v in tiled.items()}}


def paired_differences(summaries: dict) -> dict:
  """Per seed, mean test accuracy of each adapter method minus LoRA's, minus one-LoRA-per-task's and minus
  the probe's (same seed, same test rows): {method: {"vs_lora": {...}, ...}} in accuracy points."""
  refs = {"vs_lora": "lora", "vs_per_task_lora": "per_task_lora", "vs_linear_probe": "linear_probe"}
  out = {}
  for method, s in summaries.items():
    if "accuracy/mean" not in s or method in ("linear_probe",):
      continue
    row = {}
    for key, ref in refs.items():
      if ref == method or ref not in summaries or "accuracy/mean" not in summaries[ref]:
        continue
      a, b = s["accuracy/mean"]["per_seed"], summaries[ref]["accuracy/mean"]["per_seed"]
      diffs = [100 * (x - y) if x is not None and y is not None else None for x, y in zip(a, b)]
      kept = [v for v in diffs if v is not None]
      row[key] = {"per_seed": diffs, "mean": float(np.mean(kept)) if kept else None,
                  "std": float(np.std(kept)) if kept else None,
                  "min": float(np.min(kept)) if kept else None, "max": float(np.max(kept)) if kept else None}
    if row:
      out[method] = row
  return out


# ------------------------------------------------------------------------------------------- the run


def run(config, workdir: str) -> dict:
  settings = validate(config)
  start = time.perf_counter()
  names = configlib.split_names(config.method_names)
  dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
  tasks = tuple(configlib.split_names(config.data.tasks))
  subsets = _subsets(config.data, tasks)          # subset sizes are checked before the backbone is loaded
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
  print(f"== multi-task text: {len(tasks)} tasks ({sizes} train/held-out/test), {n_train} training rows, "
        f"{config.data.max_length} tokens, MiniLM x{config.model.num_layers} ({config.model.dtype}), adapters on "
        f"layers {k + 1}-{config.model.num_layers} (layers 1-{k} computed once, {time.perf_counter() - t0:.0f} s), "
        f"{len(seeds)} seeds, {settings.epochs} evaluations x {settings.steps(n_train)} steps of "
        f"{settings.batch_size}", flush=True)
  print(f"   memory estimate {estimate_bytes(config, len(tasks), n_train + len(corpus.test['task'])) / 2**30:.1f} GiB "
        "per method", flush=True)

  heads0, probe_info = probe_heads(pooled, corpus, probe_grid(config), config.probe.max_steps)
  probe_logits = head_logits(heads0, pooled["test"], corpus.test["task"], corpus.num_classes)
  head_count = sum(np.size(l) for l in jax.tree_util.tree_leaves(heads0))
  frozen = {"backbone": upper_params, **heads0}
  data = train.Data(train=corpus.train, val=corpus.val, test=corpus.test, frozen=frozen)
  batch = {key: v[:settings.batch_size] for key, v in corpus.train.items()}
  live = LiveHistory(workdir, corpus)
  step_s, layer_paths = {}, {}

  def train_one(method: runner.Method):
    if method.name == "linear_probe":
      summary = probe_summary(probe_logits, corpus, seeds, probe_info, head_count)
      print(f"  [linear_probe] test accuracy {summary['accuracy/mean']['mean'] * 100:.2f} (converged: "
            f"{all(i['converged'] for i in probe_info.values())})", flush=True)
      return None, summary
    task, adapted, count, heads = build_task(method.name, config, upper, frozen, corpus, heads0)
    method_settings = dataclasses.replace(settings, groups=train.parse_groups(method_groups(method.name, config)))
    print(f"[{method.name}] {count:,} adapter parameters + {heads:,} head parameters", flush=True)
    fit = method.fit(task, data, seeds, method_settings, log=_trainer_log(method.name),
                     on_epoch_end=live.hook(method.name, seeds, settings, task.train_names))
    if adapted is not None:
      layer_paths[method.name] = adapted.paths
    summary = summarise(method.name, fit, seeds, corpus, count, heads)
    if config.eval.step_time_repeats:
      step_s[method.name] = train.step_seconds(task, fit.params, frozen, batch, config.eval.step_time_repeats)
      summary["step_time_s"] = step_s[method.name]
    mean = summary["accuracy/mean"]
    timing = f"; step {step_s[method.name] * 1e3:.0f} ms" if method.name in step_s else ""
    print(f"  [{method.name}] test accuracy {_fmt_pm(mean)}, macro-F1 {_fmt_pm(summary['macro_f1/mean'])}"
          f"{timing}; {fit.wall_time_s:.0f} s" + ("" if fit.status == ["ok"] * len(seeds) else
                                                 f"; NOT ALL SEEDS OK: {summary['status']}"), flush=True)
    return fit, summary

  def failed(name, reason):
    return {"status": reason, "params": None, "adapter_params": None, "head_params": head_count, "seeds": seeds}

  summaries, fits = runner.run_methods(names, train_one, failed=failed,
                                       checkpoints=checkpoint.policy(config, workdir), log=print)
  if "lora" in step_s:
    for method, seconds in step_s.items():
      summaries[method]["step_time_vs_lora"] = seconds / step_s["lora"]
  paired = paired_differences(summaries)
  wall = time.perf_counter() - start
  markdown = _markdown(config, corpus, summaries, paired, wall)
  _figures(workdir, fits, corpus, settings, layer_paths)
  print(markdown, flush=True)
  results.write_run(workdir, "multitask_text", config, summaries, {}, wall, markdown,
                    extra={"tasks": list(tasks), "counts": corpus.counts, "paired_differences": paired},
                    history_csv=live.files.csv_text(), live=live.files)
  print(f"wrote {workdir}/results.json, results.md, history.csv, tb/, accuracy.png, loss.png, routing_*.png "
        f"({time.perf_counter() - start:.0f} s total)", flush=True)
  return {"methods": summaries, "paired_differences": paired}


def _trainer_log(method: str):
  """The trainer's own lines (groups, resume, divergence), without its per-epoch metric line: the live
  history prints a readable one (the raw metrics are per-task counts)."""
  prefix = f"  [{method}] epoch "
  return lambda line: None if line.startswith(prefix) else print(line, flush=True)


# ------------------------------------------------------------------------------------------- live files


class LiveHistory:
  """The per-evaluation rows and scalars of every method (accuracy and macro-F1 per task and split, training
  loss and aux, router diagnostics), derived from the fit's per-task counts and handed to
  `results.LiveLong`, which writes history.csv and TensorBoard; also the progress line."""

  def __init__(self, workdir: str, corpus: Corpus):
    self.corpus = corpus
    self.files = results.LiveLong(workdir)

  def hook(self, method: str, seeds, settings: train.Settings, train_names: Sequence[str]):
    start = time.perf_counter()

    def rows_of(values, split, name):                                             # values [seeds, evals]
      return [(seeds[s], ev + 1, split, name, float(values[s, ev])) for s in range(values.shape[0])
              for ev in range(values.shape[1]) if np.isfinite(values[s, ev])]

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
      routed = (f"  router H {scalars.get('routing/entropy_nats', nan):.3f} sep "
                f"{scalars.get('routing/task_separation', nan):.3f}" if routed else "")
      loss = scalars.get("train_stream/loss", nan)
      print(f"  [{method}] eval {fit_state.epoch:>2}/{settings.epochs}  loss {loss:.3f}  "
            f"held-out acc {per_task}  mean {val * 100:5.1f}{routed}  ({time.perf_counter() - start:.0f}s)",
            flush=True)
    return on_epoch_end


# ------------------------------------------------------------------------------------------- tables, figures


def _fmt_pm(entry, scale=100.0) -> str:
  if entry.get("mean") is None:
    return "n/a"
  return f"{entry['mean'] * scale:.2f} ± {entry['std'] * scale:.2f}"


def _fmt(value, spec: str = ".3f") -> str:
  """A number, or "n/a" where there is none (every seed diverged)."""
  return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _markdown(config, corpus: Corpus, summaries: dict, paired: dict, wall: float) -> str:
  tasks = corpus.tasks
  d = config.data
  lines = [f"# Multi-task text stream on MiniLM-L6 ({config.model.num_layers} layers, frozen; adapters on layers "
           f"{config.model.frozen_layers + 1}-{config.model.num_layers})", "",
           "Tasks (train / held-out / test rows): " + ", ".join(
               f"{t} {c['train']:,} / {c['val']:,} / {c['test']:,}" for t, c in corpus.counts.items())
           + f". {d.max_length} tokens at most, {config.num_seeds} seeds, batch {config.optim.batch_size}, "
           f"{config.optim.epochs} x {config.optim.steps_per_epoch or 'one pass'} steps, lr {config.optim.lr}, "
           f"heads from {'the probe (LP-FT)' if config.model.heads == 'probe' else 'N(0, 0.02^2)'}; router losses: "
           f"load balance {config.router.load_balance}, z {config.router.z_loss}; anchors' router: lr x"
           f"{config.router.anchor_lr_mult:g}, weight decay {config.router.anchor_weight_decay:g}, U(+-"
           f"{config.router.anchor_init_scale:g}) start; oracle margin {config.router.oracle_margin:g}.", "",
           "Test accuracy % per task, mean over tasks, and macro-F1 % (mean ± std over the seeds that did not "
           "diverge; † marks a method with a diverged seed, left out of its means):", "",
           "| Method | Adapter params | " + " | ".join(tasks) + " | mean acc | mean macro-F1 | step (ms) | vs LoRA |",
           "|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
  for method, s in summaries.items():
    label = LABELS[method] + (" †" if s.get("status", "ok") != "ok" and "accuracy/mean" in s else "")
    if "accuracy/mean" not in s:
      lines.append(f"| {label} | - | " + " | ".join("-" for _ in tasks) + f" | {s['status']} | | | |")
      continue
    step, ratio = s.get("step_time_s"), s.get("step_time_vs_lora")
    lines.append(f"| {label} | {s['adapter_params']:,} | " + " | ".join(_fmt_pm(s[f"accuracy/{t}"]) for t in tasks)
                 + f" | {_fmt_pm(s['accuracy/mean'])} | {_fmt_pm(s['macro_f1/mean'])} | "
                 + (f"{step * 1e3:.0f} | {ratio:.2f}x" if step is not None and ratio is not None else "- | -") + " |")
  diverged = [(m, s["status"]) for m, s in summaries.items() if "accuracy/mean" in s and s.get("status") != "ok"]
  if diverged:
    lines += [""] + [f"† {LABELS[m]}: {status}" for m, status in diverged]
  lines += ["", "Macro-F1 % per task:", "", "| Method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
  for method, s in summaries.items():
    if "macro_f1/mean" in s:
      dagger = " †" if s.get("status", "ok") != "ok" else ""
      lines.append(f"| {LABELS[method]}{dagger} | " + " | ".join(_fmt_pm(s[f"macro_f1/{t}"]) for t in tasks) + " |")
  routed = [(m, s) for m, s in summaries.items() if "routing_entropy_nats" in s]
  if routed:
    lines += ["", f"Routers on the first {config.eval.diagnostic_rows} test rows (seed mean): mean gate entropy in "
              f"nats (uniform over E = {np.log(config.model.num_experts):.3f}) and task separation (total variation "
              "between two tasks' mean gates, averaged over task pairs, cells and layers; 0: all tasks routed "
              "alike, 1: disjoint experts), at initialisation and after training:", "",
              "| Method | entropy init | entropy end | separation init | separation end |", "|---|---|---|---|---|"]
    lines += [f"| {LABELS[m]}{' †' if s.get('status', 'ok') != 'ok' else ''} | "
              + " | ".join(_fmt(s.get(key)) for key in ("routing_entropy_init_nats", "routing_entropy_nats",
                                                        "task_separation_init", "task_separation")) + " |"
              for m, s in routed]
  if paired:
    lines += ["", "Paired differences in mean test accuracy (points), per seed (same seed, same test rows): "
              "mean ± std [min, max] over seeds:", "",
              "| Method | − LoRA | − one LoRA per task | − linear probe |", "|---|---|---|---|"]
    for method, row in paired.items():
      cells = []
      for key in ("vs_lora", "vs_per_task_lora", "vs_linear_probe"):
        v = row.get(key)
        cells.append("-" if v is None or v["mean"] is None else
                     f"{v['mean']:+.2f} ± {v['std']:.2f} [{v['min']:+.2f}, {v['max']:+.2f}]")
      lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
  if "linear_probe" in summaries and "probe" in summaries["linear_probe"]:
    info = summaries["linear_probe"]["probe"]
    lines += ["", "Linear probe: " + "; ".join(f"{t} L2 {i['l2']:g} ({i['iterations']} L-BFGS steps, gradient norm "
                                               f"{i['grad_norm']:.1e})" for t, i in info.items()) + "."]
  timing = (f"Step time: one vmapped training step of all seeds, median of {config.eval.step_time_repeats}, on this "
            "machine. " if config.eval.step_time_repeats else "Step time not measured (eval.step_time_repeats=0). ")
  lines += ["", timing + f"Run time {wall:.0f} s."]
  return "\n".join(lines) + "\n"


def _layer_name(path: str) -> str:
  return (path.replace(BACKBONE_PREFIX + "encoder/layer_", "L").replace("/attention/self/", " ")
          .replace("/attention/output/dense", " attn out").replace("/intermediate/dense", " ffn in")
          .replace("/output/dense", " ffn out"))


def _finite_prefix(curves: dict) -> dict:
  """{name: [seeds, evals]} cut after the last evaluation any seed has a finite value at (the seeds all
  diverged there); a method with none is left out of the figure."""
  out = {}
  for name, values in curves.items():
    seen = np.flatnonzero(np.isfinite(np.asarray(values, np.float64)).any(axis=0))
    if seen.size:
      out[name] = np.asarray(values)[:, :seen[-1] + 1]
  return out


def _figures(workdir: str, fits: dict, corpus: Corpus, settings: train.Settings, layer_paths: dict) -> None:
  if fits:
    every = f"every {settings.steps_per_epoch or 'pass'} steps"
    curves = _finite_prefix({m: task_scores(f.history[:, :, 1], corpus.tasks, corpus.num_classes)["accuracy/mean"]
                             for m, f in fits.items()})                              # fractions: plotted in %
    plots.curves_with_bands(os.path.join(workdir, "accuracy.png"), curves, labels=LABELS,
                            title="mean held-out accuracy over tasks", xlabel=f"evaluation ({every})",
                            ylabel="held-out accuracy (%)")
    losses = _finite_prefix({m: f.train_history[:, :, 0] for m, f in fits.items()})
    plots.curves_with_bands(os.path.join(workdir, "loss.png"), losses, labels=LABELS,
                            title="training loss (mean over the steps of each evaluation)",
                            xlabel=f"evaluation ({every})", ylabel="cross-entropy", scale=1.0)
  for method, fit in fits.items():
    if "usage" not in fit.diagnostics:
      continue
    usage = fit.diagnostics["usage"][0, -1]                                        # [layers, tasks, routers, E]
    names = [_layer_name(p) for p in layer_paths.get(method, ())]
    plots.routing_heatmaps(os.path.join(workdir, f"routing_{method}.png"), usage, corpus.tasks, layer_names=names,
                           title=f"{LABELS[method]}: expert usage per layer, cell and task (seed 0, test rows)")
