"""Parity and separation of the two routers (paper Section 4: Theorem 1, Theorem 2).

Each cell (i, j) of a K x K grid has two rank-r candidate blocks P_ij^0, P_ij^1; context d writes, at every
cell, the candidate its pattern c_d(i, j) picks. "uniform": two contexts, each picking the same candidate at
every cell (routing-uniform, Definition 3, so Theorem 1 predicts block-wise = cell-wise). "heterogeneous":
four contexts whose patterns are all-0, all-1, the diagonal and the off-diagonal (Definition 4 at E = 2, so
Theorem 2 predicts cell-wise < block-wise in error). Headline: cell-wise minus block-wise test R², per seed.
"""

import time

import numpy as np

from localmoe import configlib, metrics, results, single_layer, train

UNIFORM = [lambda i, j: 0, lambda i, j: 1]  # the candidate each context picks at cell (i, j)
FAMILIES = {"uniform": UNIFORM, "heterogeneous": UNIFORM + [lambda i, j: int(i != j), lambda i, j: int(i == j)]}


def make_data(config, seeds, family: str) -> train.Data:
  dc, patterns, split, b = config.data, FAMILIES[family], [], config.data.d // config.data.k
  for seed in seeds:
    rng = np.random.default_rng(seed)
    cand = rng.standard_normal((2, dc.k, dc.k, b, dc.rank)) @ rng.standard_normal((2, dc.k, dc.k, dc.rank, b))
    cand /= np.sqrt(dc.rank * b)  # [2, K, K, b, b]
    w = np.stack([np.block([[cand[p(i, j), i, j] for j in range(dc.k)] for i in range(dc.k)]) for p in patterns])
    x = rng.standard_normal((dc.num_samples, dc.d)).astype(np.float32)
    ctx = rng.integers(0, len(patterns), dc.num_samples)
    y = np.einsum("nod,nd->no", w[ctx], x).astype(np.float32)  # [n, d]: context ctx's map applied to x
    rows = {"x": x, "context": np.eye(len(patterns), dtype=np.float32)[ctx], "y": y}
    split.append({k: (v[: -dc.num_test], v[-dc.num_test :]) for k, v in rows.items()})
  stack = lambda part: {k: np.stack([s[k][part] for s in split]) for k in split[0]}
  w0 = np.zeros((len(seeds), dc.d, dc.d), np.float32)  # the frozen W0
  return train.Data(train=stack(0), test=stack(1), frozen={"w0": w0}, per_seed=True)


def validate(config) -> None:
  """Every config error before any compute: seeds, memory, and each method and its groups per family."""
  dc = config.data
  for family in configlib.split_names(dc.families):
    single_layer.validate_methods(config, dc.num_samples - dc.num_test, 0.0, dc.d, dc.d, len(FAMILIES[family]))


def run(config, workdir: str) -> dict:
  start, families = time.perf_counter(), configlib.split_names(config.data.families)
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  validate(config)

  def report(family, summaries, fits, seconds, contexts):
    gap = metrics.paired_difference(summaries, "cellwise_moe", "blockwise_moe", "test_r2")
    section = f"## {family} ({contexts} contexts)\n\n{results.markdown_table(summaries)}\n\n"
    section += f"cell-wise - block-wise test R², paired by seed (points): {metrics.format_difference(gap, 100)}\n"
    print(section, flush=True)
    return {"cellwise_minus_blockwise_r2": gap}, section

  data_of = lambda family: (make_data(config, seeds, family), len(FAMILIES[family]), len(FAMILIES[family]))
  done = single_layer.run_variants(config, workdir, families, data_of, report, config.data.d, config.data.d, {})
  markdown = "# Parity and separation of the routers (paper Section 4)\n\n" + "\n".join(done.sections)
  return done.write(workdir, "routing_separation", config, families[0], time.perf_counter() - start, markdown)
