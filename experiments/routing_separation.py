"""Parity and separation of the two routers (paper Section 4: Theorem 1, Theorem 2).

Each cell (i, j) of a K x K grid has two rank-r candidate blocks P_ij^0, P_ij^1; context d writes, at every
cell, the candidate its pattern c_d(i, j) picks. "uniform": two contexts, each picking the same candidate at
every cell (routing-uniform, Definition 3, so Theorem 1 predicts block-wise = cell-wise). "heterogeneous":
four contexts whose patterns are all-0, all-1, the diagonal and the off-diagonal (Definition 4 at E = 2, so
Theorem 2 predicts cell-wise < block-wise in error). Headline: cell-wise minus block-wise test R², per seed.
"""

import time

import numpy as np

from localmoe import checkpoint, configlib, metrics, results, single_layer, train

FAMILIES = {"uniform": [lambda i, j: 0, lambda i, j: 1],
            "heterogeneous": [lambda i, j: 0, lambda i, j: 1, lambda i, j: int(i != j), lambda i, j: int(i == j)]}


def make_data(config, seeds, family: str) -> train.Data:
  dc, patterns, split = config.data, FAMILIES[family], []
  b = dc.d // dc.k
  for seed in seeds:
    rng = np.random.default_rng(seed)
    cand = rng.standard_normal((2, dc.k, dc.k, b, dc.rank)) @ rng.standard_normal((2, dc.k, dc.k, dc.rank, b))
    cand /= np.sqrt(dc.rank * b)                                                    # [2, K, K, b, b]
    w = np.stack([np.block([[cand[p(i, j), i, j] for j in range(dc.k)] for i in range(dc.k)]) for p in patterns])
    x = rng.standard_normal((dc.num_samples, dc.d)).astype(np.float32)
    ctx = rng.integers(0, len(patterns), dc.num_samples)
    rows = {"x": x, "context": np.eye(len(patterns), dtype=np.float32)[ctx],
            "y": np.einsum("nod,nd->no", w[ctx], x).astype(np.float32)}
    split.append({k: (v[:-dc.num_test], v[-dc.num_test:]) for k, v in rows.items()})
  stack = lambda part: {k: np.stack([s[k][part] for s in split]) for k in split[0]}
  zeros = np.zeros((len(seeds), dc.d, dc.d), np.float32)                           # the frozen W0
  return train.Data(train=stack(0), test=stack(1), frozen={"w0": zeros}, per_seed=True)


def run(config, workdir: str) -> dict:
  start, names = time.perf_counter(), configlib.split_names(config.method_names)
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  settings = single_layer.validate_common(config, config.data.num_samples - config.data.num_test)
  live, variants, histories, sections = results.Live(workdir), {}, {}, []
  for family in configlib.split_names(config.data.families):
    contexts = len(FAMILIES[family])
    modules = single_layer.build_methods(config.methods, names, config.data.d, config.data.d, contexts)
    summaries, fits = single_layer.run_methods(modules, make_data(config, seeds, family), seeds, settings,
                                               config.data.d, contexts, {}, live=live, prefix=f"{family}/",
                                               checkpoints=checkpoint.policy(config, workdir, family))
    gap = metrics.paired_difference(summaries, "cellwise_moe", "blockwise_moe", "test_r2")
    variants[family] = {"methods": summaries, "cellwise_minus_blockwise_r2": gap}
    histories.update({f"{family}/{n}": (seeds, f) for n, f in fits.items()})
    sections.append(f"## {family} ({contexts} contexts)\n\n{results.markdown_table(summaries)}\n\n"
                    f"cell-wise - block-wise test R², paired by seed (points): {metrics.format_difference(gap, 100)}\n")
    print(sections[-1], flush=True)
  wall = time.perf_counter() - start
  markdown = "# Parity and separation of the routers (paper Section 4)\n\n" + "\n".join(sections)
  first = variants[configlib.split_names(config.data.families)[0]]
  results.write_run(workdir, "routing_separation", config, first["methods"], histories, wall, markdown,
                    extra={"variants": variants}, live=live)
  return {"methods": first["methods"], "variants": variants, "wall_time_s": wall}
