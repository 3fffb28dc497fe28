"""SVD multi-field simulation (paper Section 3.1, Table 1).

d = 64 inputs/outputs cut into K = 4 fields of 16; D = 3 contexts with block-diagonal, checkerboard and
upper-shift topologies (Eq. 13-15); every active block U Sigma V^T (Eq. 12); y = W_target^(d) x; frozen
W0 ~ N(0, 0.01^2). Every seed is a full replicate: its own targets, W0, samples, split and initialisation.
"""

from __future__ import annotations

import time

import numpy as np

from localmoe import checkpoint, configlib, results, single_layer, targets, train

PAPER = {  # Table 1 (R^2 as a fraction)
  "melora": {"params": 2048, "mse": 0.9525, "r2": 0.1000},
  "localized_lora": {"params": 2048, "mse": 0.8401, "r2": 0.2062},
  "lora": {"params": 2048, "mse": 0.8390, "r2": 0.2072},
  "blockwise_moe": {"params": 2054, "mse": 0.7746, "r2": 0.2681},
  "cellwise_moe": {"params": 2144, "mse": 0.6531, "r2": 0.3829},
}
LABELS = {
  "melora": "MELoRA",
  "localized_lora": "Localized LoRA",
  "lora": "LoRA",
  "blockwise_moe": "Localized LoRA-MoE (Global)",
  "cellwise_moe": "Localized LoRA-MoE (Cell-Wise)",
}
ORDERING = [["cellwise_moe"], ["blockwise_moe"], ["lora", "localized_lora"], ["melora"]]
PAPER_IMPLIED_TARGET_VARIANCE = 0.8390 / (1 - 0.2072)  # MSE / (1 - R^2) of LoRA's row: SST per coordinate


def make_data(config, seeds, spectrum_name: str):
  """Per-seed replicates: train/test {"x", "context", "y"}, frozen {"w0"}, plus diagnostics."""
  dc = config.data
  contexts = configlib.split_names(dc.contexts)
  masks = np.stack([targets.topology_mask(name, dc.k) for name in contexts])  # [D, K, K]
  per_seed = {"train": [], "test": [], "w0": [], "ceiling": [], "target_var": [], "base_var": []}
  for seed in seeds:
    rng = np.random.default_rng(seed)  # same seed -> same U, V for every spectrum
    w_target = targets.block_targets(
      rng, masks, dc.d, dc.d, spectrum_name, dc.block_scale, dc.share_blocks, dc.spectrum_decay
    )  # [D, d, d]
    w0 = (dc.w0_std * rng.standard_normal((dc.d, dc.d))).astype(np.float32)
    x = rng.standard_normal((dc.num_samples, dc.d)).astype(np.float32)
    ctx = rng.integers(0, len(contexts), dc.num_samples)
    y = np.einsum("nod,nd->no", w_target[ctx], x).astype(np.float32)
    onehot = np.eye(len(contexts), dtype=np.float32)[ctx]
    tr, te = single_layer.split_train_test(rng, dc.num_samples, dc.test_fraction)
    per_seed["train"].append({"x": x[tr], "context": onehot[tr], "y": y[tr]})
    per_seed["test"].append({"x": x[te], "context": onehot[te], "y": y[te]})
    per_seed["w0"].append(w0)
    per_seed["ceiling"].append(single_layer.least_squares_r2(x[tr], y[tr], x[te], y[te]))
    per_seed["target_var"].append(float(y[te].var(0).mean()))
    per_seed["base_var"].append(float((x[te] @ w0.T).var(0).mean()))
  stack = lambda dicts: {k: np.stack([d[k] for d in dicts]) for k in dicts[0]}
  data = train.Data(
    train=stack(per_seed["train"]), test=stack(per_seed["test"]), frozen={"w0": np.stack(per_seed["w0"])}, per_seed=True
  )
  diagnostics = {k: float(np.mean(per_seed[k])) for k in ("ceiling", "target_var", "base_var")}
  return data, diagnostics, len(contexts)


def validate(config) -> None:
  """Every config error, before any compute (names the field and the fix)."""
  dc = config.data
  for name in configlib.split_names(dc.spectra) or ["(empty)"]:
    if name not in targets.SPECTRA:
      raise ValueError(f"config.data.spectra: {name!r} is not known; valid: {list(targets.SPECTRA)}.")
  contexts = configlib.split_names(dc.contexts)
  for name in contexts or ["(empty)"]:
    if name not in targets.TOPOLOGIES:
      raise ValueError(f"config.data.contexts: {name!r} is not a known topology; valid: {sorted(targets.TOPOLOGIES)}.")
  checkpoint.every_epochs(config)
  if not isinstance(dc.num_samples, int) or dc.num_samples < 2:
    raise ValueError(f"config.data.num_samples={dc.num_samples!r} must be an integer >= 2 (e.g. 10000).")
  if not isinstance(dc.d, int) or not isinstance(dc.k, int) or dc.d < 1 or dc.k < 1 or dc.d % dc.k:
    raise ValueError(
      f"config.data.k={dc.k!r} must divide config.data.d={dc.d!r} (the d x d map is cut into "
      f"k x k fields of d/k): choose k among the divisors of {dc.d}."
    )
  if not dc.spectrum_decay > 0:
    raise ValueError(f"config.data.spectrum_decay={dc.spectrum_decay!r} must be > 0 (e.g. 4.0).")
  if not 0 < dc.test_fraction < 1:
    raise ValueError(f"config.data.test_fraction={dc.test_fraction} must lie in (0, 1).")
  num_train = dc.num_samples - int(round(dc.num_samples * dc.test_fraction))
  if num_train < 1:
    raise ValueError(
      f"config.data.num_samples={dc.num_samples} leaves no training samples at "
      f"test_fraction={dc.test_fraction}: use more samples."
    )
  data_bytes = 4.0 * config.num_seeds * (dc.num_samples * (2 * dc.d + len(contexts)) + dc.d * dc.d)
  single_layer.validate_methods(config, num_train, data_bytes, dc.d, dc.d, len(contexts))


def run(config, workdir: str) -> dict:
  start = time.perf_counter()
  validate(config)
  names = configlib.split_names(config.method_names)
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  settings = train.Settings.from_config(config.optim)
  spectra = configlib.split_names(config.data.spectra)

  def data_of(spectrum_name):
    print(
      f"== SVD simulation, spectrum={spectrum_name}: {len(names)} methods x {len(seeds)} seeds x "
      f"{settings.epochs} epochs",
      flush=True,
    )
    data, diag, num_contexts = make_data(config, seeds, spectrum_name)
    return data, num_contexts, diag

  def report(spectrum_name, summaries, fits, table_time, diag):
    holds, sentence = results.ordering_check(summaries, ORDERING, LABELS)
    section = "\n".join(
      [
        f"## Spectrum: {spectrum_name}" + (" (default)" if spectrum_name == spectra[0] else ""),
        "",
        results.markdown_table(summaries, LABELS),
        "",
        f"Paper's ordering (cell-wise > global > static > MELoRA) {'holds' if holds else 'does NOT hold'}: {sentence}.",
        "",
        f"Target variance per output coordinate (test): {diag['target_var']:.4f} (the paper's Table 1 implies "
        f"about {PAPER_IMPLIED_TARGET_VARIANCE:.2f}); variance of the frozen W0 x: {diag['base_var']:.4f}. "
        f"Best static linear map, unlimited rank (least squares): test R² {diag['ceiling'] * 100:.2f}%.",
        f"Table wall time: {table_time:.1f} s (compilation included).",
      ]
    )
    print(f"== spectrum={spectrum_name}: table in {table_time:.1f}s", flush=True)
    print(results.markdown_table(summaries, LABELS), flush=True)
    print(f"ordering {'holds' if holds else 'does NOT hold'}: {sentence}", flush=True)
    return {"wall_time_s": table_time, **diag}, section

  done = single_layer.run_variants(config, workdir, spectra, data_of, report, config.data.d, config.data.d, PAPER)
  wall = time.perf_counter() - start
  header = (
    "# SVD simulation (paper Section 3.1, Table 1)\n\n"
    f"{len(seeds)} seeds (each a full replicate: targets, W0, data, split, init), "
    f"{settings.epochs} epochs, batch {settings.batch_size}, AdamW lr {settings.learning_rate}, "
    f"weight decay {settings.weight_decay}. R² = 1 - SSE/SST on the test split, mean ± std over seeds.\n"
  )
  markdown = header + "\n" + "\n\n".join(done.sections) + f"\n\nTotal wall time: {wall:.1f} s.\n"
  out = done.write(workdir, "svd_simulation", config, spectra[0], wall, markdown, extra={"spectrum": spectra[0]})
  print(f"wrote {workdir}/results.json, results.md, history.csv, tb/ ({wall:.1f}s total)", flush=True)
  return out


def sweep_job(config):
  """One sweep entry (`localmoe.sweep`): one method, one seed, the first spectrum of config.data.spectra.

  Entries that differ only in seed, learning rate or weight decay share a `sweep.group_key` and train as
  one vmapped program; the entry's files are results.json / results.md / history.csv like a one-seed run.
  """
  from localmoe import sweep

  names = configlib.split_names(config.method_names)
  if len(names) != 1 or config.num_seeds != 1:
    raise ValueError(
      f"sweep entry: method_names={config.method_names!r}, num_seeds={config.num_seeds}: a sweep "
      "entry trains one method and one seed; sweep over 'method_names' and 'seed' instead."
    )
  name, seed = names[0], int(config.seed)
  spectrum = configlib.split_names(config.data.spectra)[0]
  contexts = len(configlib.split_names(config.data.contexts))
  module = single_layer.build_methods(
    config.methods, names, config.data.d, config.data.d, contexts, shared=config.adapter
  )[name]
  settings = train.Settings.from_config(config.optim)

  def finish(workdir, fit):
    summary = results.method_summary(module.num_params(), [seed], fit, PAPER.get(name))
    markdown = (
      f"# SVD simulation sweep entry: {LABELS.get(name, name)}, spectrum {spectrum}, seed {seed}, "
      f"lr {settings.learning_rate}\n\n" + results.markdown_table({name: summary}, LABELS) + "\n"
    )
    results.write_run(
      workdir,
      "svd_simulation",
      config,
      {name: summary},
      {name: ([seed], fit)},
      fit.wall_time_s,
      markdown,
      extra={"spectrum": spectrum},
    )
    return {
      "method": name,
      "spectrum": spectrum,
      "seed": seed,
      "lr": settings.learning_rate,
      "weight_decay": settings.weight_decay,
      "params": module.num_params(),
      "test_r2": summary["test_r2_mean"],
      "test_mse": summary["test_mse_mean"],
      "train_mse": float(fit.final("train", "mse")[0]),
    }

  return sweep.Job(
    task=single_layer.layer_task(module, config.data.d, contexts),
    data=lambda: make_data(config, [seed], spectrum)[0],
    settings=settings,
    seed=seed,
    learning_rate=settings.learning_rate,
    weight_decay=settings.weight_decay,
    finish=finish,
    label=f"{name} ({spectrum})",
  )
