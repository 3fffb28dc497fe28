"""MNIST domain adaptation, digits 0-4 -> 5-9 (Localized LoRA paper, Numerical Experiment 2, Figure 2).

A 784-64(ReLU)-5 MLP is pretrained on digits 0-4, frozen, and adapted to digits 5-9 (relabelled 0-4) by an
adapter on its first layer, added before the activation (the paper's Table II):

  logits = W2 relu(W1 x + b1 + Delta(x)) + b2,      Delta = LoRA, MELoRA, Localized LoRA, LoRA-MoE

or by full fine-tuning of all 50,565 parameters. Classification uses the shared trainer through its Task
hooks: per-example cross-entropy as the loss; loss, accuracy and the Brier MSE (squared error of the class
probabilities against the one-hot label, averaged over the 5 classes) as metrics, on train, validation
and test every epoch. results.json's test_r2 is 1 - Brier MSE / label variance, the R^2 of the predicted
probabilities, so that the file has the repository's common schema.

`run` trains the configured methods once (one budget); `sweep_job` turns a sweep entry into one vmapped
group member for `localmoe.sweep`, and `summarize_sweep` picks the best configuration per method and
parameter budget on validation loss, reports its test accuracy and draws Figure 2 (accuracy drop from
full fine-tuning against the fraction of trainable parameters).

The pretrained MLP and the data are built once per process (cached by their config), so the entries of a
sweep share them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import checkpoint, configlib, results, runner, single_layer, train
from localmoe.train import optimizer
from localmoe.data import cache

D_IN, HIDDEN, CLASSES = 784, 64, 5
FULL = single_layer.FULL_FINETUNE
PAPER_FULL = {"params": 50_565, "accuracy": 0.9759}  # Figure 2's caption; the other points are only plotted
LABELS = {
  FULL: "Full fine-tuning",
  "lora": "LoRA",
  "melora": "MELoRA",
  "localized_lora": "Localized LoRA",
  "blockwise_moe": "Block-wise LoRA-MoE",
  "cellwise_moe": "Cell-wise LoRA-MoE",
}
METRIC_NAMES = ("loss", "accuracy", "mse")


# ------------------------------------------------------------------------------------------- model


def mlp_params_count() -> int:
  return D_IN * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES  # 50,565


def init_mlp(key: jax.Array) -> dict[str, jax.Array]:
  """PyTorch nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  u = lambda k, shape, fan_in: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0) / np.sqrt(fan_in)
  return {
    "w1": u(k1, (D_IN, HIDDEN), D_IN),
    "b1": u(k2, (HIDDEN,), D_IN),
    "w2": u(k3, (HIDDEN, CLASSES), HIDDEN),
    "b2": u(k4, (CLASSES,), HIDDEN),
  }


def pixels(x: jax.Array) -> jax.Array:
  """uint8 [batch, 784] -> float32 in [0, 1]."""
  return x.astype(jnp.float32) / 255.0


def mlp_logits(mlp: Mapping[str, jax.Array], x: jax.Array, delta: jax.Array | float = 0.0) -> jax.Array:
  """[batch, 784] floats -> logits [batch, 5]; `delta` [batch, 64] is added before the ReLU."""
  h = jax.nn.relu(x @ mlp["w1"] + mlp["b1"] + delta)  # [batch, 64]
  return h @ mlp["w2"] + mlp["b2"]  # [batch, 5]


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example cross-entropy [batch] of logits [batch, 5] against integer labels [batch]."""
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]


def classification_metrics(logits: jax.Array, y: jax.Array) -> jax.Array:
  """[batch, 3]: cross-entropy, correct (0/1), Brier MSE (mean over classes of (p - onehot)^2)."""
  probs = jax.nn.softmax(logits)
  onehot = jax.nn.one_hot(y, logits.shape[-1])
  correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  brier = jnp.mean((probs - onehot) ** 2, axis=-1)
  return jnp.stack([cross_entropy(logits, y), correct, brier], axis=-1)


def classification_task(init, predict) -> train.Task:
  return train.Task(
    init=init,
    predict=predict,
    loss=cross_entropy,
    metric_names=METRIC_NAMES,
    per_example_metrics=classification_metrics,
  )


def full_task() -> train.Task:
  """Every MLP parameter trainable, initialised from the pretrained (frozen) copy."""
  return classification_task(
    lambda key, frozen: jax.tree_util.tree_map(jnp.array, frozen),
    lambda params, frozen, inputs: mlp_logits(params, pixels(inputs["x"])),
  )


def adapter_task(module) -> train.Task:
  """An adapter on the frozen first layer, before the ReLU."""
  x0 = jnp.zeros((1, D_IN), jnp.float32)

  def init(key, frozen):
    del frozen
    return module.init(key, x0)["params"]

  def predict(params, frozen, inputs):
    x = pixels(inputs["x"])
    return mlp_logits(frozen, x, module.apply({"params": params}, x))

  return classification_task(init, predict)


def build_method(config, name: str):
  """(module or None for full fine-tuning, trainable parameter count) of config.methods[name]
  (`single_layer.method_spec` with config.adapter's defaults, `single_layer.build_method`)."""
  spec = single_layer.method_spec(config.methods, name, config.adapter)
  module = single_layer.build_method(spec, name, D_IN, HIDDEN)
  return (None, mlp_params_count()) if module is None else (module, module.num_params())


# ------------------------------------------------------------------------------------------- data


def _digits(text: str) -> list[int]:
  return [int(d) for d in configlib.split_names(text)]


@functools.lru_cache(maxsize=4)
def _images():
  from localmoe.data.mnist import load_mnist

  return load_mnist()


def _select(images, labels, digits, limit, rng):
  """Flattened uint8 images [n, 784] and labels mapped to 0..len(digits)-1 [n], optionally subsampled."""
  keep = np.flatnonzero(np.isin(labels, digits))
  if limit:
    keep = np.sort(rng.permutation(keep)[:limit])
  lookup = np.full(10, -1, np.int32)
  lookup[digits] = np.arange(len(digits))
  return images[keep].reshape(len(keep), -1), lookup[labels[keep]]


def pretrain_policy(data_config: dict, pretrain_config: dict) -> checkpoint.Policy:
  """Checkpoints of the pretraining fit: `<data dir>/pretrained/mnist_adaptation/<hash of its config>`, shared
  by every run and sweep entry with the same data and pretraining settings (it resumes, and a finished one is
  loaded instead of retrained); tied to that config like any other checkpoint."""
  config = {"data": data_config, "pretrain": pretrain_config}
  digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
  directory = os.path.join(str(cache.data_dir()), "pretrained", "mnist_adaptation", digest)
  return checkpoint.Policy(directory, every_epochs=0, config=config)


@functools.lru_cache(maxsize=4)
def _prepared(data_json: str, pretrain_json: str):
  """(adaptation Data with pretrained frozen MLP, pretraining info). Cached: sweep entries share it."""
  dc, pc = json.loads(data_json), json.loads(pretrain_json)
  raw = _images()
  rng = np.random.default_rng(dc["split_seed"])
  source, target = _digits(dc["source_digits"]), _digits(dc["target_digits"])
  if len(source) != CLASSES or len(target) != CLASSES:
    raise ValueError(f"config.data: source_digits and target_digits must name {CLASSES} digits each.")

  # Pretraining on the source digits (MNIST train / test of digits 0-4).
  sx, sy = _select(raw["train_images"], raw["train_labels"], source, dc["max_train"], rng)
  tx_, ty_ = _select(raw["test_images"], raw["test_labels"], source, dc["max_test"], rng)
  pre = train.Data(train={"x": sx, "y": sy}, test={"x": tx_, "y": ty_})
  settings = train.Settings(
    epochs=pc["epochs"], batch_size=pc["batch_size"], learning_rate=pc["lr"], weight_decay=pc["weight_decay"]
  )
  t0 = time.perf_counter()
  task = classification_task(lambda key, frozen: init_mlp(key), lambda p, f, inputs: mlp_logits(p, pixels(inputs["x"])))
  fit = train.fit(
    task, pre, [pc["seed"]], settings, name="pretrain 0-4", log=print, checkpoints=pretrain_policy(dc, pc)
  )
  mlp = jax.tree_util.tree_map(lambda a: np.asarray(a[0]), fit.params)
  info = {
    "source_test_accuracy": float(fit.final("test", "accuracy")[0]),
    "epochs": pc["epochs"],
    "train_examples": int(len(sy)),
    "wall_time_s": time.perf_counter() - t0,
  }

  # Adaptation data: MNIST train digits 5-9 split into train / validation, MNIST test digits 5-9.
  ax, ay = _select(raw["train_images"], raw["train_labels"], target, dc["max_train"], rng)
  order = rng.permutation(len(ay))
  n_val = int(round(len(ay) * dc["val_fraction"]))
  val, tr = order[:n_val], order[n_val:]
  ex, ey = _select(raw["test_images"], raw["test_labels"], target, dc["max_test"], rng)
  data = train.Data(
    train={"x": ax[tr], "y": ay[tr]}, val={"x": ax[val], "y": ay[val]}, test={"x": ex, "y": ey}, frozen=mlp
  )
  before = np.argmax(np.asarray(mlp_logits(mlp, pixels(jnp.asarray(ex)))), -1) == ey
  info["target_test_accuracy_before"] = float(np.mean(before))
  info.update(train_examples_target=int(len(tr)), val_examples=int(n_val), test_examples=int(len(ey)))
  print(
    f"[mnist] pretrained on digits {source}: test accuracy {info['source_test_accuracy']:.4f}; frozen "
    f"model on digits {target} before adaptation: {info['target_test_accuracy_before']:.4f}",
    flush=True,
  )
  return data, info


def prepared(config):
  return _prepared(
    json.dumps(config.data.to_dict(), sort_keys=True), json.dumps(config.pretrain.to_dict(), sort_keys=True)
  )


def label_variance(y: np.ndarray) -> float:
  """Mean over classes of the variance of the one-hot label: SST per coordinate of the probabilities' R^2."""
  freq = np.bincount(np.asarray(y), minlength=CLASSES) / len(y)
  return float(np.mean(freq * (1 - freq)))


# ------------------------------------------------------------------------------------------- one run


def validate(config) -> None:
  """Every config error, before any compute (names the field and the fix)."""
  dc = config.data
  if not 0 < dc.val_fraction < 1:
    raise ValueError(f"config.data.val_fraction={dc.val_fraction} must lie in (0, 1).")
  for field in ("source_digits", "target_digits"):
    digits = _digits(getattr(dc, field))
    if len(digits) != CLASSES or len(set(digits)) != CLASSES or not all(0 <= d <= 9 for d in digits):
      raise ValueError(f"config.data.{field}={getattr(dc, field)!r} must name {CLASSES} distinct digits 0-9.")
  if not isinstance(config.num_seeds, int) or config.num_seeds < 1:
    raise ValueError(f"config.num_seeds={config.num_seeds!r} must be a positive integer.")
  checkpoint.every_epochs(config)
  settings = train.Settings.from_config(config.optim)
  train.Settings(
    epochs=config.pretrain.epochs,
    batch_size=config.pretrain.batch_size,
    learning_rate=config.pretrain.lr,
    weight_decay=config.pretrain.weight_decay,
  )
  names = configlib.split_names(config.method_names)
  if not names:
    raise ValueError("config.method_names is empty: name at least one of config.methods.")
  mlp = jax.eval_shape(init_mlp, jax.random.PRNGKey(0))  # the pretrained MLP's shapes
  for name in names:
    module, _ = build_method(config, name)
    task = full_task() if module is None else adapter_task(module)
    optimizer.check_groups(settings, task.init, mlp, where=f" (method {name})")  # groups against its params


def method_summary(params: int, seeds, lr: float, fit: train.FitResult, var_test: float) -> dict[str, Any]:
  """results.json entry: accuracies, losses, Brier MSE and the probabilities' R^2 (fractions)."""
  out = results.method_summary(
    params,
    seeds,
    fit,
    extra={"train_loss": fit.final("train", "loss"), "test_r2": 1.0 - fit.final("test", "mse") / var_test},
  )
  out.pop("paper")
  out.update(fraction=params / mlp_params_count(), lr=float(lr))
  return out


def _table(methods: Mapping[str, Mapping[str, Any]]) -> str:
  lines = [
    "| Method | Params | Fraction | lr | Val loss | Test accuracy % (ours) | Test accuracy % (paper) | Status |",
    "|---|---|---|---|---|---|---|---|",
  ]
  pct = lambda m, k: "n/a" if m.get(f"{k}_mean") is None else f"{100 * m[f'{k}_mean']:.2f} ± {100 * m[f'{k}_std']:.2f}"
  for name, m in methods.items():
    paper = m.get("paper") or {}
    paper_acc = f"{100 * paper['accuracy']:.2f}" if paper.get("accuracy") else "(plot only)"
    val = "n/a" if m.get("val_loss_mean") is None else f"{m['val_loss_mean']:.4f}"
    lines.append(
      f"| {LABELS.get(m.get('method', name), name)} | {m['params']:,} | {100 * m['fraction']:.2f}% "
      f"| {m['lr']:g} | {val} | {pct(m, 'test_accuracy')} | {paper_acc} | {m['status']} |"
    )
  return "\n".join(lines)


def write_results(
  workdir: str,
  config,
  methods: Mapping[str, Any],
  histories,
  info: Mapping[str, Any],
  wall: float,
  title: str,
  live: results.Live | None = None,
) -> None:
  markdown = (
    f"# {title}\n\nPretrained MLP: test accuracy {100 * info['source_test_accuracy']:.2f}% on the "
    f"source digits, {100 * info['target_test_accuracy_before']:.2f}% on the target digits before "
    f"adaptation. {info['train_examples_target']} train / {info['val_examples']} validation / "
    f"{info['test_examples']} test examples.\n\n" + _table(methods) + "\n"
  )
  results.write_run(
    workdir, "mnist_adaptation", config, methods, histories, wall, markdown, extra={"pretrain": dict(info)}, live=live
  )


def _paper(name_method: str) -> dict[str, Any]:
  """Figure 2 reports only full fine-tuning as numbers; r2/mse are not in the paper (None)."""
  if name_method == FULL:
    return {"params": PAPER_FULL["params"], "accuracy": PAPER_FULL["accuracy"], "r2": None, "mse": None}
  return {}


def run(config, workdir: str) -> dict:
  """Trains every method of config.method_names (all seeds vmapped per method) at config.optim.lr."""
  start = time.perf_counter()
  validate(config)
  data, info = prepared(config)
  settings = train.Settings.from_config(config.optim)
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  var_test = label_variance(data.test["y"])
  live = results.Live(workdir)

  def train_one(method: runner.Method):
    name = method.name
    module, params = build_method(config, name)
    print(
      f"[{name}] {params:,} trainable parameters ({100 * params / mlp_params_count():.2f}%), "
      f"{len(seeds)} seed(s), {settings.epochs} epochs",
      flush=True,
    )
    fit = method.fit(full_task() if module is None else adapter_task(module), data, seeds, settings)
    return fit, {
      "method": config.methods[name].method,
      **method_summary(params, seeds, settings.learning_rate, fit, var_test),
      "paper": _paper(config.methods[name].method),
    }

  def failed(name, reason):
    return {
      "method": config.methods[name].method,
      "params": build_method(config, name)[1],
      "seeds": seeds,
      "fraction": build_method(config, name)[1] / mlp_params_count(),
      "lr": settings.learning_rate,
      "status": reason,
      "paper": _paper(config.methods[name].method),
    }

  methods, fits = runner.run_methods(
    configlib.split_names(config.method_names),
    train_one,
    failed=failed,
    checkpoints=checkpoint.policy(config, workdir),
    live=live,
  )
  histories = {name: (seeds, fit) for name, fit in fits.items()}
  wall = time.perf_counter() - start
  write_results(
    workdir,
    config,
    methods,
    histories,
    info,
    wall,
    "MNIST adaptation 0-4 -> 5-9 (Localized LoRA paper, Experiment 2): one budget",
    live=live,
  )
  print(_table(methods), flush=True)
  print(f"wrote {workdir}/results.json, results.md, history.csv, tb/ ({wall:.1f}s)", flush=True)
  return {"methods": methods, "wall_time_s": wall}


# ------------------------------------------------------------------------------------------- sweeps


def _shape_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
  """rank / blocks (MELoRA's N, the grid's K) / experts of a method spec, for the sweep table."""
  return {
    "rank": spec.get("rank"),
    "blocks": spec.get("num_blocks", spec.get("k_x")),
    "experts": spec.get("num_experts"),
  }


def sweep_job(config):
  """One sweep entry: one method, one seed, one learning rate. Same method and sizes -> same group."""
  from localmoe import sweep

  names = configlib.split_names(config.method_names)
  if len(names) != 1 or config.num_seeds != 1:
    raise ValueError(
      f"sweep entry: method_names={config.method_names!r}, num_seeds={config.num_seeds}: a sweep "
      "entry trains one method and one seed; sweep over 'method_names' and 'seed' instead."
    )
  name, seed = names[0], int(config.seed)
  module, params = build_method(config, name)
  settings = train.Settings.from_config(config.optim)
  spec = config.methods[name].to_dict()
  shape = _shape_fields(spec)
  label = f"{name} " + " ".join(f"{k}={v}" for k, v in shape.items() if v is not None)

  def finish(workdir, fit):
    data, info = prepared(config)
    summary = {
      "method": spec["method"],
      **method_summary(params, [seed], settings.learning_rate, fit, label_variance(data.test["y"])),
      "paper": _paper(spec["method"]),
    }
    write_results(
      workdir,
      config,
      {name: summary},
      {name: ([seed], fit)},
      info,
      fit.wall_time_s,
      f"MNIST adaptation sweep entry: {label}, lr {settings.learning_rate:g}, seed {seed}",
    )
    return {
      "method": spec["method"],
      **shape,
      "params": params,
      "fraction": params / mlp_params_count(),
      "lr": settings.learning_rate,
      "seed": seed,
      **{k: summary[f"{k}_mean"] for k in ("val_loss", "val_accuracy", "test_accuracy", "test_loss", "train_loss")},
    }

  return sweep.Job(
    task=full_task() if module is None else adapter_task(module),
    data=lambda: prepared(config)[0],
    settings=settings,
    seed=seed,
    learning_rate=settings.learning_rate,
    weight_decay=settings.weight_decay,
    finish=finish,
    label=label,
  )


def best_per_budget(rows) -> tuple[dict | None, dict[str, list[dict]]]:
  """(best full fine-tuning row, {method: best row per parameter budget}), selected on validation loss.

  Rows of one configuration (method, sizes, lr) with several seeds are averaged first.
  """
  configs: dict[str, list[dict]] = {}
  for r in rows:
    if r.get("status") == "ok" and r.get("val_loss") is not None:
      key = json.dumps([r["method"], r.get("rank"), r.get("blocks"), r.get("experts"), r["lr"]])
      configs.setdefault(key, []).append(r)
  averaged = []
  for members in configs.values():
    row = dict(members[0])
    for k in ("val_loss", "val_accuracy", "test_accuracy", "test_loss"):
      row[k] = float(np.mean([m[k] for m in members]))
    row["test_accuracy_std"] = float(np.std([m["test_accuracy"] for m in members]))
    row["seeds"] = len(members)
    averaged.append(row)
  best: dict[tuple, dict] = {}
  for row in averaged:
    key = (row["method"], row["params"])
    if key not in best or row["val_loss"] < best[key]["val_loss"]:
      best[key] = row
  full = best.pop((FULL, mlp_params_count()), None)
  curves: dict[str, list[dict]] = {}
  for (method, _), row in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    curves.setdefault(method, []).append(row)
  return full, curves


def _plot(path: str, full: dict, curves: Mapping[str, list[dict]]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  markers = dict(lora="o", melora="s", localized_lora="^", blockwise_moe="D", cellwise_moe="v")
  for method, rows in curves.items():
    x = [100 * r["fraction"] for r in rows]
    y = [100 * (full["test_accuracy"] - r["test_accuracy"]) for r in rows]
    ax.plot(x, y, marker=markers.get(method, "o"), label=LABELS.get(method, method))
  ax.axhline(0.0, color="gray", lw=0.8, ls="--")
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters (% of full fine-tuning, 50,565)")
  ax.set_ylabel("accuracy drop from full fine-tuning (points)")
  ax.set_title(f"MNIST 0-4 -> 5-9: full fine-tuning {100 * full['test_accuracy']:.2f}% (paper 97.59%)")
  ax.legend()
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def summarize_sweep(summary: Mapping[str, Any], config, workdir: str) -> dict[str, Any]:
  """Best configuration per method and budget (validation loss), its test accuracy, and Figure 2."""
  full, curves = best_per_budget(summary["entries"])
  lines = ["## Figure 2: best configuration per parameter budget (selected on validation loss)", ""]
  if full is None:
    return {
      "markdown": "\n".join(
        lines
        + [
          "No finished full fine-tuning entry: Figure 2 needs it as the "
          "reference. Add method_names=full_finetune entries."
        ]
      )
      + "\n"
    }
  lines += [
    f"Full fine-tuning (ours): {full['params']:,} parameters, lr {full['lr']:g}, test accuracy "
    f"{100 * full['test_accuracy']:.2f}% (paper: {PAPER_FULL['params']:,} parameters, "
    f"{100 * PAPER_FULL['accuracy']:.2f}%).",
    "",
    "| Method | Params | Fraction | Best config | lr | Val loss | Test accuracy % | Drop vs our full FT (points) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  table = []
  for method, rows in curves.items():
    for r in rows:
      shape = ", ".join(f"{k}={r[k]}" for k in ("rank", "blocks", "experts") if r.get(k) is not None)
      drop = 100 * (full["test_accuracy"] - r["test_accuracy"])
      table.append(
        {
          "method": method,
          "params": r["params"],
          "fraction": r["fraction"],
          "config": shape,
          "lr": r["lr"],
          "val_loss": r["val_loss"],
          "test_accuracy": r["test_accuracy"],
          "drop_points": drop,
          "entry": r["index"],
        }
      )
      lines.append(
        f"| {LABELS.get(method, method)} | {r['params']:,} | {100 * r['fraction']:.2f}% | {shape} "
        f"| {r['lr']:g} | {r['val_loss']:.4f} | {100 * r['test_accuracy']:.2f} | {drop:+.2f} |"
      )
  figure = os.path.join(workdir, "figures", "figure2_accuracy_drop.png")
  _plot(figure, full, curves)
  lines += ["", _paper_claims(curves), "", f"Figure: `figures/{os.path.basename(figure)}`."]
  return {
    "markdown": "\n".join(lines) + "\n",
    "figure2": {"full_finetune": full, "points": table, "figure": os.path.relpath(figure, workdir)},
  }


def _paper_claims(curves: Mapping[str, list[dict]]) -> str:
  """The paper's claim, checked where budgets coincide: Localized LoRA >= LoRA and MELoRA at equal budget."""
  by = {m: {r["params"]: r["test_accuracy"] for r in rows} for m, rows in curves.items()}
  local = by.get("localized_lora", {})
  parts = []
  for other in ("lora", "melora"):
    shared = sorted(set(local) & set(by.get(other, {})))
    if shared:
      wins = sum(local[p] >= by[other][p] for p in shared)
      parts.append(f"Localized LoRA >= {LABELS[other]} at {wins} of {len(shared)} shared budgets")
  return (
    "Paper's claim (Localized LoRA has the lowest drop across budgets), checked on test accuracy: "
    + ("; ".join(parts) if parts else "no shared budgets in this sweep")
    + "."
  )
