"""Gemma 3 270M benchmark: one training step per adapter method as a ratio to LoRA, and generation speed.

Every projection of every block (q/k/v/o, gate/up/down; `gemma3.TARGETS`) carries the adapter; methods are at
parameter parity with LoRA of rank 8 (printed). One step is a jit-compiled forward, backward and AdamW update of
the adapters alone (`nnx.Optimizer(..., wrt=nnx_inject.AdapterParam)`), the loss being next-token cross-entropy
on the last `--loss-tokens` positions (the full 262k-vocabulary logits of every position cost more than the
model: an instruction stream scores the answer only) plus the routers' load-balance loss, on random token ids
with a random task id per example. Methods are timed round-robin after an untimed round; the figure is the median.
Memory is XLA's own account of each compiled step (arguments + outputs + temporaries), and the process's peak
RSS at the end. Generation: `gemma3_generate.generate` (jit-compiled prefill and KV-cache decode), greedy,
after a warm-up call, for the plain model, LoRA, cell-wise LoRA-MoE routed on the task id, and that model
merged for one task (`nnx_inject.merge`).

Usage:
  python benchmarks/gemma_step.py                    # 18 layers, 8 x 128 tokens, 3 repeats
  python benchmarks/gemma_step.py --quick            # 2 layers, 2 x 16 tokens, 1 repeat (smoke test)
  python benchmarks/gemma_step.py --random-weights   # Gemma's shapes with random weights (no download)
  python benchmarks/gemma_step.py --json gemma.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from localmoe import inject, nnx_inject  # noqa: E402
from localmoe.models import gemma3, gemma3_generate  # noqa: E402

TASKS = 4
SPECS = {  # parameter parity with LoRA rank 8 on each layer: r (d_in + d_out) = 8 (d_in + d_out)
  "lora": dict(method="lora", rank=8),
  "localized_lora": dict(method="localized_lora", k_y=2, k_x=2, rank=4),
  "blockwise_moe": dict(
    method="blockwise_moe", k_y=2, k_x=2, rank=2, num_experts=2, router_input="context", context_dim=TASKS
  ),
  "cellwise_moe": dict(
    method="cellwise_moe", k_y=2, k_x=2, rank=2, num_experts=2, router_input="context", context_dim=TASKS
  ),
  "cellwise_moe_activation": dict(
    method="cellwise_moe", k_y=2, k_x=2, rank=2, num_experts=2, router_input="activation"
  ),
  "per_task_lora": dict(method="per_task_lora", rank=2, context_dim=TASKS),
}
TARGETS = {"cellwise_moe": 1.15}  # issue target: routed step <= 1.15x LoRA's


def backbone(layers: int, random_weights: bool):
  if not random_weights:
    return gemma3.load(num_layers=layers)[0]
  rng = np.random.default_rng(0)
  config = gemma3.Config(num_layers=layers)
  abstract = nnx.eval_shape(lambda: gemma3.Gemma3(config, rngs=nnx.Rngs(0)))
  tensors = {
    name: rng.standard_normal(abstract_shape(abstract, path, t), np.float32) * 0.02
    for path, name, t in gemma3.gguf_names(layers)
  }
  return gemma3.from_tensors(tensors, config)


def abstract_shape(model, path: str, transpose: bool) -> tuple[int, ...]:
  node = model
  for key in path.split("/"):
    node = node[int(key)] if key.isdigit() else getattr(node, key)
  shape = tuple(node.shape)
  return shape[::-1] if transpose else shape


def adapted(base, method: str):
  model = nnx.clone(base)
  nnx_inject.inject(
    model, SPECS[method], jnp.zeros((1, 4), jnp.int32), target_modules=gemma3.TARGETS, key=jax.random.PRNGKey(0)
  )
  return model


def compiled_step(model, ids, task, loss_tokens: int):
  """(compiled step, (frozen, state), XLA bytes, compile s): forward + backward + AdamW on the adapters."""
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx_inject.AdapterParam)
  frozen_filter = nnx.All(nnx.Param, nnx.Not(nnx_inject.AdapterParam))
  graphdef, frozen, state = nnx.split((model, optimizer), frozen_filter, ...)  # weights apart: never donated

  def step(frozen, state, ids, task):
    model, optimizer = nnx.merge(graphdef, frozen, state)

    def loss_fn(model):
      with nnx_inject.routing_context(model, task) as traces:
        hidden = model(ids, return_hidden=True)  # [B, T, W]
      logits = model.logits(hidden[:, -loss_tokens - 1 : -1])  # [B, L, vocab]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, -loss_tokens:]).mean()
      return ce + inject.router_losses(traces, load_balance=0.01)["aux_loss"]

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx_inject.AdapterParam))(model)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer), nnx.Not(frozen_filter))

  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=1).lower(frozen, state, ids, task).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  nbytes = (
    None
    if mem is None
    else int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  )
  _, state = compiled(frozen, state, ids, task)  # warm-up
  return compiled, (frozen, state), nbytes, compile_s


def gen_speed(model, prompts, new_tokens: int, context=None) -> tuple[float, np.ndarray]:
  """(generated tokens per second, tokens) of a greedy decode after one warm-up call."""
  gemma3_generate.generate(model, prompts, new_tokens, context=context, eos_ids=())
  start = time.perf_counter()
  out, _ = gemma3_generate.generate(model, prompts, new_tokens, context=context, eos_ids=())
  return out.size / (time.perf_counter() - start), out


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=18, help="Gemma blocks (default all 18)")
  p.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
  p.add_argument("--tokens", type=int, default=128, help="tokens per example (default 128)")
  p.add_argument("--loss-tokens", type=int, default=16, help="positions scored per example (default 16)")
  p.add_argument("--repeats", type=int, default=3, help="timed steps per method (default 3)")
  p.add_argument("--methods", default=",".join(SPECS), help=f"comma-separated, from {','.join(SPECS)}")
  p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per prompt (default 32)")
  p.add_argument("--quick", action="store_true", help="2 layers, 2 x 16 tokens, 1 repeat, 4 new tokens")
  p.add_argument("--random-weights", action="store_true", help="Gemma's shapes, random weights (no download)")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = p.parse_args(argv)
  if args.quick:
    args.layers, args.batch, args.tokens, args.loss_tokens, args.repeats, args.new_tokens = 2, 2, 16, 4, 1, 4
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in SPECS]
  if unknown or "lora" not in methods:
    p.error(f"--methods: {unknown or 'lora is required (the reference)'}; choose from {','.join(SPECS)}")
  if not (
    1 <= args.layers <= 18
    and 2 <= args.tokens <= 4096
    and 1 <= args.loss_tokens < args.tokens
    and min(args.batch, args.repeats, args.new_tokens) >= 1
  ):
    p.error("--layers in 1..18, --tokens in 2..4096, --loss-tokens in 1..tokens-1, the rest >= 1")
  args.methods = methods
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  print("gemma_step: one step (fwd + bwd + AdamW on the adapters) of Gemma 3 270M per method, and generation")
  print(
    f"  backend: {jax.default_backend()}  devices: {jax.devices()}  jax {jax.__version__}  "
    f"cpu cores: {os.cpu_count()}  python {platform.python_version()}"
  )
  print(
    f"  {args.layers} layers{' (random weights)' if args.random_weights else ''}, batch {args.batch} x "
    f"{args.tokens} tokens, loss on the last {args.loss_tokens}; median of {args.repeats} round-robin steps"
  )
  base = backbone(args.layers, args.random_weights)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, 200_000, (args.batch, args.tokens)), jnp.int32)
  task = jnp.asarray(rng.integers(0, TASKS, args.batch), jnp.int32)
  built, counts = {}, {}
  for method in args.methods:
    model = adapted(base, method)
    counts[method] = nnx_inject.num_params(model)
    built[method] = compiled_step(model, ids, task, args.loss_tokens)
    print(f"  compiled {method} in {built[method][3]:.1f} s", file=sys.stderr, flush=True)
  times = {m: [] for m in args.methods}
  for repeat in range(args.repeats + 1):  # round 0: untimed
    for method, (compiled, (frozen, state), nbytes, compile_s) in built.items():
      start = time.perf_counter()
      loss, state = compiled(frozen, state, ids, task)
      jax.block_until_ready(loss)
      if repeat:
        times[method].append(time.perf_counter() - start)
      built[method] = (compiled, (frozen, state), nbytes, compile_s)
  lora = statistics.median(times["lora"])
  rows = []
  print(f"\n  {'method':24s} {'adapter params':>14s} {'step ms':>9s} {'x LoRA':>7s} {'XLA MB':>8s} {'compile s':>9s}")
  for method, (_, _, nbytes, compile_s) in built.items():
    med = statistics.median(times[method])
    rows.append(
      dict(
        method=method,
        params=int(counts[method]),
        step_ms=1e3 * med,
        vs_lora=med / lora,
        xla_bytes=nbytes,
        compile_s=compile_s,
      )
    )
    print(
      f"  {method:24s} {counts[method]:14,d} {1e3 * med:9.1f} {med / lora:6.2f}x "
      f"{(nbytes or 0) / 1e6:8.0f} {compile_s:9.1f}"
    )
  for name, target in TARGETS.items():
    if name in times:
      ratio = statistics.median(times[name]) / lora
      print(f"  target {name} / lora <= {target}x -- {ratio:.2f}x {'MET' if ratio <= target else 'NOT met'}")
  del built
  prompts = [list(map(int, row[: args.tokens])) for row in np.asarray(ids)]
  speeds = {"plain": gen_speed(base, prompts, args.new_tokens)[0]}
  speeds["lora"] = gen_speed(adapted(base, "lora"), prompts, args.new_tokens, task)[0]
  routed = adapted(base, "cellwise_moe")
  speeds["cellwise_moe"], out_routed = gen_speed(routed, prompts, args.new_tokens, jnp.zeros_like(task))
  speeds["merged"], out_merged = gen_speed(nnx_inject.merge(routed, context=0), prompts, args.new_tokens)
  print(f"\n  generation, {args.batch} prompts x {args.tokens} tokens, {args.new_tokens} new each (greedy):")
  for name, speed in speeds.items():
    print(f"  {name:24s} {speed:9.1f} tokens/s")
  print(f"  merged generates what cell-wise (task 0) generates: {bool((out_routed == out_merged).all())}")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(f"  peak RSS of this process: {peak / 2**30:.2f} GiB")
  result = dict(
    layers=args.layers,
    batch=args.batch,
    tokens=args.tokens,
    loss_tokens=args.loss_tokens,
    backend=jax.default_backend(),
    random_weights=args.random_weights,
    rows=rows,
    generation_tokens_per_s=speeds,
    peak_rss_bytes=peak,
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"  wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
