"""Nonconvex regression benchmark (Queryable LoRA paper, Sec. 4.1 and App. B.3, Tables 1, 2, 9, 10).

A backbone is pretrained per function on the source task and frozen; every method then adapts it to the
shifted target through `localmoe.inject` (adapters on every hidden Dense, routers on activations) or, for
full fine-tuning, trains all of it. All (function, seed) pairs train together as one vmapped entry axis.

Pretraining and adaptation both go through `localmoe.train.fit`, with `config.optim.eval_every` epochs per
compiled call (evaluating every epoch would be most of the cost of 5,000 epochs on CPU), checkpoints under
<workdir>/checkpoints/<init>/{pretrain,<method>} and the trainer's preemption and divergence handling.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import checkpoint, configlib, inject, models, results, runner, single_layer, train
from localmoe import params as params_lib
from localmoe.train import optimizer
from localmoe.data import functions2d as f2

# Paper, App. B.3 (32 x 32 GELU MLP): Table 9 (best target-train MSE) and Table 10 (best held-out MSE).
# Columns: full fine-tuning (SOAP*), LoRA, DoRA, Ours (queryable). Raw label units, no std given.
PAPER_T9 = {
  "ackley": (13.124, 13.124, 13.123, 0.113),
  "dropwave": (0.582, 223.643, 234.136, 1.291),
  "langermann": (5.502, 5.502, 5.502, 0.021),
  "levy": (324.969, 324.956, 324.971, 7.173),
  "matyas": (0.017, 0.135, 753.808, 0.087),
  "michalewicz": (0.125, 0.125, 0.125, 0.054),
  "rastrigin": (1.270, 49.880, 77.443, 22.812),
  "sincos": (1.011, 1.011, 1.011, 0.161),
  "styblinski_tang": (21.271, 11.843, 24.708, 10.898),
}
PAPER_T10 = {
  "ackley": (13.230, 13.227, 13.220, 0.673),
  "dropwave": (25.096, 193.122, 246.421, 9.828),
  "langermann": (5.815, 5.815, 5.815, 0.195),
  "levy": (337.855, 337.855, 337.855, 136.888),
  "matyas": (0.068, 0.870, 749.881, 0.345),
  "michalewicz": (0.136, 0.136, 0.136, 0.135),
  "rastrigin": (156.795, 113.054, 1172.995, 127.405),
  "sincos": (0.924, 0.924, 0.924, 0.920),
  "styblinski_tang": (14.063, 11.736, 24.460, 8.953),
}
# Paper, Sec. 4.1 (8-layer, width-256 Transformer): Table 1 (training MSE) and Table 2 (test MSE), means.
# No full fine-tuning column there.
PAPER_T1 = {
  "ackley": (None, 0.0754, 0.1544, 0.0559),
  "dropwave": (None, 24.0509, 266.2681, 0.2527),
  "langermann": (None, 2.2579, 2.4252, 1.8061),
  "levy": (None, 0.0124, 0.01388, 0.0009),
  "matyas": (None, 0.0034, 0.0061, 0.0032),
  "michalewicz": (None, 0.0590, 0.0745, 0.0380),
  "rastrigin": (None, 22.4812, 25.4298, 3.3663),
  "sincos": (None, 0.0002, 0.0003, 0.0001),
  "styblinski_tang": (None, 2.0728, 2.2513, 0.3862),
}
PAPER_T2 = {
  "ackley": (None, 0.3734, 0.3716, 0.3726),
  "dropwave": (None, 64.5079, 374.8006, 2.2263),
  "langermann": (None, 2.2596, 2.5835, 1.9344),
  "levy": (None, 1.3273, 1.3395, 1.3028),
  "matyas": (None, 0.0255, 0.0231, 0.0229),
  "michalewicz": (None, 0.1301, 0.1299, 0.1288),
  "rastrigin": (None, 98.7647, 98.8097, 99.6905),
  "sincos": (None, 0.0039, 0.0040, 0.0039),
  "styblinski_tang": (None, 67.2361, 75.5779, 62.2928),
}
PAPER_TABLES = {
  "mlp": (PAPER_T9, PAPER_T10, "Table 9", "Table 10"),
  "transformer": (PAPER_T1, PAPER_T2, "Table 1", "Table 2"),
}
PAPER_COLUMNS = ("full_finetune", "lora", "dora", "queryable_lora")
LABELS = {
  "full_finetune": "Full FT (AdamW)",
  "lora": "LoRA",
  "dora": "DoRA",
  "localized_lora": "Localized LoRA",
  "blockwise_moe": "Block-wise MoE",
  "cellwise_moe": "Cell-wise MoE",
  "queryable_lora": "Queryable LoRA",
}
LOCALMOE_METHODS = ("localized_lora", "blockwise_moe", "cellwise_moe", "queryable_lora")


def paper_value(table, name, method):
  return table[name][PAPER_COLUMNS.index(method)] if method in PAPER_COLUMNS and name in table else None


# ------------------------------------------------------------------------------------------- data


def _function_data(config, names, seeds):
  """Source (train/test) per function and target (train/test) per (function, seed), all standardised."""
  dc = config.data
  source, target, info = [], [], {}
  n_test = int(round(dc.source_samples * dc.source_test_fraction))
  for f, name in enumerate(names):
    mean, std = f2.target_stats(name)
    scale = lambda x, y: (np.asarray(f2.standardize_inputs(x, name), np.float32), ((y - mean) / std).astype(np.float32))
    x, y = scale(*f2.sample_task(name, dc.source_samples, seed=10_000 * (config.seed + 1) + f, noise_sd=dc.noise_sd))
    source.append({"train": {"x": x[n_test:], "y": y[n_test:]}, "test": {"x": x[:n_test], "y": y[:n_test]}})
    shift = f2.make_shift(name, seed=config.seed, shift_scale=dc.shift_scale)
    for s in seeds:
      x, y = scale(
        *f2.sample_task(name, dc.target_samples, seed=20_000 + 100 * s + f, shift=shift, noise_sd=dc.noise_sd)
      )
      k = dc.target_train
      target.append({"train": {"x": x[:k], "y": y[:k]}, "test": {"x": x[k:], "y": y[k:]}})
    info[name] = {"label_mean": mean, "label_std": std, "shift": shift.to_dict()}
  stack = lambda items, split: {k: np.stack([it[split][k] for it in items]) for k in items[0][split]}
  return (
    {"train": stack(source, "train"), "test": stack(source, "test")},
    {"train": stack(target, "train"), "test": stack(target, "test")},
    info,
  )


# ------------------------------------------------------------------------------------------- training


def _backbone(config, init_scheme):
  mc = config.model
  if mc.backbone == "mlp":
    return models.DeepNarrowMLP(depth=mc.depth, width=mc.width, init_scheme=init_scheme)
  if mc.backbone == "transformer":
    return models.SmallTransformer(depth=mc.depth, width=mc.width, heads=mc.heads, init_scheme=init_scheme)
  raise ValueError(f"config.model.backbone={mc.backbone!r}: use 'mlp' or 'transformer'.")


def _method_spec(config, name):
  """config.methods[name] (`single_layer.method_spec`), alpha = config.adapter.scale x rank for an adapter."""
  spec = single_layer.method_spec(config.methods, name)
  if spec["method"] != single_layer.FULL_FINETUNE:
    spec["alpha"] = config.adapter.scale * spec["rank"]
  return spec


def _task(config, name, model, example_params):
  """(Task, trainable parameter count) of one method."""
  x0 = jnp.zeros((1, 2), jnp.float32)
  spec = _method_spec(config, name)
  if spec["method"] == single_layer.FULL_FINETUNE:
    task = train.Task(
      init=lambda key, frozen: frozen, predict=lambda p, frozen, inputs: model.apply({"params": p}, inputs["x"])
    )
    return task, params_lib.count_params(example_params)
  try:
    adapted, _ = inject.inject(
      model, example_params, spec, x0, target_modules=config.adapter.target_modules, key=jax.random.PRNGKey(0)
    )
  except ValueError as error:
    raise ValueError(f"config.methods.{name}: {error}") from None
  task = train.Task(
    init=lambda key, frozen: adapted.init_adapter(key, frozen),
    predict=lambda p, frozen, inputs: adapted.apply(frozen, p, inputs["x"]),
  )
  return task, adapted.num_params()


def pretrain_settings(config) -> train.Settings:
  """The backbone's pretraining: config.pretrain, evaluated once at the end."""
  pre = config.pretrain
  return train.Settings(
    epochs=pre.epochs,
    batch_size=pre.batch_size,
    learning_rate=pre.lr,
    weight_decay=pre.weight_decay,
    eval_every=pre.epochs,
  )


def validate(config) -> None:
  """Every config error, before any compute."""
  for name in configlib.split_names(config.data.functions) or ["(empty)"]:
    if name not in f2.FUNCTIONS:
      raise ValueError(f"config.data.functions: {name!r} is not known; valid: {list(f2.FUNCTIONS)}.")
  names = configlib.split_names(config.method_names)
  unknown = [n for n in names if n not in config.methods]
  if unknown or not names:
    raise ValueError(f"config.method_names: {unknown or 'empty'} not among {sorted(config.methods)}.")
  for scheme in configlib.split_names(config.model.inits):
    if scheme not in models.KERNEL_INITS:
      raise ValueError(f"config.model.inits: {scheme!r} is not one of {models.KERNEL_INITS}.")
  if not 0 < config.data.target_train < config.data.target_samples:
    raise ValueError(
      f"config.data.target_train={config.data.target_train} must lie in "
      f"(0, target_samples={config.data.target_samples})."
    )
  settings = train.Settings.from_config(config.optim)
  settings.check_batch(config.data.target_train)
  pretrain_settings(config).check_batch(
    config.data.source_samples - int(round(config.data.source_samples * config.data.source_test_fraction))
  )
  if not isinstance(config.num_seeds, int) or config.num_seeds < 1:
    raise ValueError(f"config.num_seeds={config.num_seeds!r} must be a positive integer.")
  checkpoint.every_epochs(config)
  model = _backbone(config, configlib.split_names(config.model.inits)[0])
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2))))["params"]
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  for name in names:
    task, _ = _task(config, name, model, params)
    optimizer.check_groups(settings, task.init, params, where=f" (method {name})")  # groups against its params


# ------------------------------------------------------------------------------------------- reporting


def _stat(values):
  values = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
  return (float(values.mean()), float(values.std())) if values.size else (None, None)


def _pm(mean, std):
  if mean is None:
    return "n/a"
  digits = 4 if abs(mean) < 10 else 2
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _paper(v):
  return "—" if v is None else (f"{v:.3f}")


def _per_function(fit, names, seeds, info, method, paper_train, paper_test):
  """{function: raw-unit best-train / best-test / final-test MSE per seed} for one method."""
  out = {}
  mse_train, mse_test = fit.curve("train", "mse"), fit.curve("test", "mse")  # [entries, epochs]
  for f, name in enumerate(names):
    rows = slice(f * len(seeds), (f + 1) * len(seeds))
    var = info[name]["label_std"] ** 2
    status = fit.status[rows]
    ok = [s == "ok" for s in status]
    take = lambda a: [float(v) * var if good else None for v, good in zip(a, ok)]
    entry = {
      "best_train_mse": take(np.nanmin(mse_train[rows], axis=1)),
      "best_test_mse": take(np.nanmin(mse_test[rows], axis=1)),
      "final_test_mse": take(mse_test[rows, -1]),
      "status": "ok" if all(ok) else "; ".join(f"seed {s}: {st}" for s, st in zip(seeds, status) if st != "ok"),
    }
    for key in ("best_train_mse", "best_test_mse", "final_test_mse"):
      entry[key + "_mean"], entry[key + "_std"] = _stat(entry[key])
    entry["paper_best_train_mse"] = paper_value(paper_train, name, method)
    entry["paper_best_test_mse"] = paper_value(paper_test, name, method)
    out[name] = entry
  return out


def _tables(per_function, counts, names, methods, backbone) -> str:
  blocks = []
  t_train, t_test, n_train, n_test = PAPER_TABLES[backbone]
  for key, title, paper in (
    ("best_train_mse", f"Best target-train MSE over adaptation (cf. {n_train})", t_train),
    ("best_test_mse", f"Best held-out MSE over adaptation (cf. {n_test})", t_test),
    ("final_test_mse", "Final held-out MSE (selection-free)", None),
  ):
    head = "| Function | " + " | ".join(f"{LABELS[m]} ({counts[m]:,})" for m in methods) + " |"
    lines = [f"#### {title}", "", head, "|---" * (len(methods) + 1) + "|"]
    for name in names:
      cells = []
      for m in methods:
        e = per_function[m][name]
        cell = _pm(e[key + "_mean"], e[key + "_std"])
        if e["status"] != "ok":
          cell += f" ({e['status']})"
        if paper is not None and paper_value(paper, name, m) is not None:
          cell += f" [paper {_paper(paper_value(paper, name, m))}]"
        cells.append(cell)
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)


def _plot(path, name, info, grid_n, preds):
  """Source surface, target surface, and each method's adapted prediction (seed 0), raw units."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  spec = f2.get_spec(name)
  u = np.linspace(-1, 1, grid_n, dtype=np.float32)
  z = np.stack(np.meshgrid(u, u), -1).reshape(-1, 2)  # [grid^2, 2]
  x = np.asarray(f2.unstandardize_inputs(z, name))
  shift = f2.Shift.from_dict(info["shift"])
  panels = [("source", np.asarray(f2.evaluate(name, x))), ("target", np.asarray(shift.evaluate(x)))]
  for label, predict in preds:
    panels.append((label, np.asarray(predict(z)) * info["label_std"] + info["label_mean"]))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0))
  lo, hi = min(p.min() for _, p in panels[:2]), max(p.max() for _, p in panels[:2])
  for ax, (label, values) in zip(axes, panels):
    im = ax.imshow(
      values.reshape(grid_n, grid_n),
      origin="lower",
      vmin=lo,
      vmax=hi,
      cmap="viridis",
      extent=(spec.lower[0], spec.upper[0], spec.lower[1], spec.upper[1]),
    )
    ax.set_title(label, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
  fig.colorbar(im, ax=axes, shrink=0.8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


# ------------------------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
  start = time.perf_counter()
  validate(config)
  names = configlib.split_names(config.data.functions)
  methods = configlib.split_names(config.method_names)
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  entries_seeds = [s for _ in names for s in seeds]  # entry = (function, seed)
  settings = train.Settings.from_config(config.optim)
  pre_settings = pretrain_settings(config)
  source, target, info = _function_data(config, names, seeds)
  print(
    f"== nonconvex regression, backbone={config.model.backbone}: {len(names)} functions x {len(seeds)} "
    f"seeds = {len(entries_seeds)} vmapped entries, {settings.epochs} epochs",
    flush=True,
  )

  variants, histories, sections, summary_methods = {}, {}, [], None
  live = results.Live(workdir)
  for scheme in configlib.split_names(config.model.inits):
    t0 = time.perf_counter()
    model = _backbone(config, scheme)
    backbone_task = train.Task(
      init=lambda key, frozen, m=model: m.init(key, jnp.zeros((1, 2)))["params"],
      predict=lambda p, frozen, inputs, m=model: m.apply({"params": p}, inputs["x"]),
    )
    src = train.Data(train=source["train"], test=source["test"], frozen=np.zeros(len(names)), per_seed=True)
    pre_fit = train.fit(
      backbone_task,
      src,
      [config.seed + 1000 * (f + 1) for f in range(len(names))],
      pre_settings,
      name=f"pretrain/{scheme}",
      checkpoints=checkpoint.policy(config, workdir, scheme, "pretrain"),
    )
    check = {}
    for f, name in enumerate(names):
      var = info[name]["label_std"] ** 2
      const = float(np.mean((source["test"]["y"][f] - source["train"]["y"][f].mean()) ** 2))
      check[name] = {
        "source_test_mse": float(pre_fit.final("test", "mse")[f]) * var,
        "constant_test_mse": const * var,
        "ratio": float(pre_fit.final("test", "mse")[f]) / const,
      }
    learned = [n for n in names if check[n]["ratio"] < 0.5]
    print(
      f"== init={scheme}: backbone learned the source (test MSE < half the constant predictor's) on "
      f"{len(learned)}/{len(names)} functions",
      flush=True,
    )
    backbones = pre_fit.params  # [functions, ...]
    frozen = jax.tree_util.tree_map(lambda a: jnp.repeat(a, len(seeds), axis=0), backbones)  # [entries, ...]
    data = train.Data(train=target["train"], test=target["test"], frozen=frozen, per_seed=True)
    example = jax.tree_util.tree_map(lambda a: a[0], backbones)
    per_function, counts, fits = {}, {}, {}

    def train_one(method: runner.Method, scheme=scheme, model=model, example=example, data=data):
      m = method.name
      task, counts[m] = _task(config, m, model, example)
      print(f"-- {m}: {counts[m]:,} trainable params", flush=True)
      fit = method.fit(task, data, entries_seeds, settings, name=f"{scheme}/{m}")
      fits[m] = (task, fit)
      per_function[m] = _per_function(fit, names, seeds, info, m, *PAPER_TABLES[config.model.backbone][:2])
      return fit, results.method_summary(counts[m], entries_seeds, fit, paper={})

    summaries, done = runner.run_methods(
      methods,
      train_one,
      failed=lambda m, reason: results.failed_summary(counts.get(m, 0), entries_seeds, reason),
      checkpoints=checkpoint.policy(config, workdir, scheme),
      live=live,
    )
    histories.update({f"{scheme}/{m}": (entries_seeds, fit) for m, fit in done.items()})
    trained = [m for m in methods if m in done]
    failures = [f"{m}: {summaries[m]['status']}" for m in methods if m not in done]
    table_time = time.perf_counter() - t0
    check_lines = ["| Function | source test MSE (backbone) | constant predictor | ratio |", "|---|---|---|---|"]
    check_lines += [
      f"| {n} | {check[n]['source_test_mse']:.4g} | {check[n]['constant_test_mse']:.4g} | {check[n]['ratio']:.3f} |"
      for n in names
    ]
    sections.append(
      "\n".join(
        [
          f"## Backbone init: {scheme}",
          "",
          f"Backbone check (source task, raw units): learned on {len(learned)}/{len(names)} functions (ratio < 0.5).",
          "",
          *check_lines,
          "",
          _tables(per_function, counts, names, trained, config.model.backbone),
          "",
          *([f"FAILED: {'; '.join(failures)}", ""] if failures else []),
          f"Table wall time: {table_time:.1f} s (pretraining and compilation included).",
        ]
      )
    )
    print(sections[-1], flush=True)
    variants[scheme] = {
      "methods": summaries,
      "per_function": per_function,
      "params": counts,
      "backbone_check": check,
      "wall_time_s": table_time,
    }
    if summary_methods is None:
      summary_methods = summaries
    if config.data.plot_grid:
      pool = [m for m in LOCALMOE_METHODS if m in trained]
      best = (
        min(pool, key=lambda m: np.nanmean([per_function[m][n]["final_test_mse_mean"] or np.inf for n in names]))
        if pool
        else None
      )
      for f, name in enumerate(names):
        entry = f * len(seeds)
        frozen_f = jax.tree_util.tree_map(lambda a: a[entry], frozen)
        preds = []
        for m in [m for m in ("lora", best) if m in fits]:
          task, fit = fits[m]
          p = jax.tree_util.tree_map(lambda a: a[entry], fit.params)
          preds.append(
            (f"{LABELS[m]} (seed {seeds[0]})", lambda z, t=task, p=p: t.predict(p, frozen_f, {"x": jnp.asarray(z)}))
          )
        _plot(os.path.join(workdir, f"{scheme}_{name}.png"), name, info[name], config.data.plot_grid, preds)

  wall = time.perf_counter() - start
  header = (
    f"# Nonconvex regression (Queryable LoRA paper, Sec. 4.1 / App. B.3), backbone "
    f"{config.model.backbone}\n\n{len(names)} functions x {len(seeds)} seeds, {settings.epochs} "
    f"adaptation epochs (evaluated every {config.optim.eval_every}), batch {settings.batch_size}, "
    f"AdamW lr {settings.learning_rate}. MSE in raw label units, mean ± std over seeds; "
    "[paper ...] = the paper's reported mean (Tables 9/10 give no std).\n"
  )
  markdown = header + "\n" + "\n\n".join(sections) + f"\n\nTotal wall time: {wall:.1f} s.\n"
  results.write_run(
    workdir,
    "nonconvex_regression",
    config,
    summary_methods,
    histories,
    wall,
    markdown,
    extra={"variants": variants, "functions": {n: info[n] for n in names}},
    live=live,
  )
  print(f"wrote {workdir}/results.json, results.md, history.csv, PNGs ({wall:.1f}s total)", flush=True)
  return {"methods": summary_methods, "variants": variants, "wall_time_s": wall}
