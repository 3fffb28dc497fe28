"""Layer benchmark: speed, memory and FLOPs of routed LoRA-MoE layers against LoRA and naive loops.

Every method is timed on the same job: a jit-compiled `jax.value_and_grad` of a sum-of-squares loss of the
adapter output with respect to the adapter parameters (forward + backward), after a warm-up call, with
`block_until_ready`; the reported time is the median over repeats (the minimum is shown too). Methods are
timed round-robin (one call of every method per repeat, with a short untimed pause after each call) so that
a load change on a shared machine hits all of them alike; the naive loops, which free hundreds of MB per
call, are timed in their own group.

Methods, all at the same expert parameter budget as LoRA at rank r_lora on a square d x d layer:
  lora                     LoRA, rank r_lora                               (2 d r_lora parameters)
  melora                   K diagonal blocks, rank r_lora each              (same count; the diagonal only)
  localized_lora           static K x K grid, rank r_lora / K per cell      (same count; no routing, so
                           it separates the cost of the grid from the cost of the routing)
  blockwise_moe            E experts per cell, one global router on x, rank r_b = r_lora / (E K) per cell
  cellwise_moe             E experts per cell, one router per cell on its field x_j, same r_b
                           (all four are the library's modules as users get them: one 2-D GEMM per input
                           field with the activation router fused in, one per output segment; see
                           `localmoe.grid`)
  *_moe [naive loop]       explicit Python loops over cells and experts with slicing, as a first research
                           implementation would be written (jit-compiled too, so XLA sees the unrolled graph)
  *_moe [dense per-example dW] materialises each example's d_out x d_in routed update (small token count only)
The naive and dense variants are checked against the library's loss and gradients (rel.err column).

Memory is XLA's own buffer assignment of the compiled executable (`compiled.memory_analysis()`):
`temp_size_in_bytes` is the scratch (activation) memory; arguments and outputs are reported separately.
FLOPs come from `compiled.cost_analysis()["flops"]`.

Usage:
  python benchmarks/layer_bench.py                        # default sizes (about a minute on 2 CPU cores)
  python benchmarks/layer_bench.py --d 2048 --tokens 8192 # the full size
  python benchmarks/layer_bench.py --quick                # tiny sizes, a few seconds (CI smoke test)
  python benchmarks/layer_bench.py --json results.json    # also write the results as JSON
  python benchmarks/layer_bench.py --profile              # per-op CPU time of LoRA and the routed layers
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import dataclasses
import glob
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import localmoe
from localmoe.adapters import common

# Default and --quick sizes. The full size of the brief (d=2048, 8192 tokens) is reachable with flags.
DEFAULTS = dict(d=1024, tokens=4096, k=4, experts=4, r_lora=64, repeats=10, dense_tokens=16)
QUICK = dict(d=64, tokens=256, k=2, experts=2, r_lora=8, repeats=3, dense_tokens=8)

# Methods timed again at the small token count of the dense per-example variant.
DENSE_SUITE = (
  "lora",
  "blockwise_moe",
  "cellwise_moe",
  "blockwise_moe [dense per-example dW]",
  "cellwise_moe [dense per-example dW]",
)

# Methods broken down op by op with --profile.
PROFILED = ("lora", "localized_lora", "blockwise_moe", "cellwise_moe")

SETTLE_S = 0.02  # untimed pause after every timed call

# Targets, as ratios to LoRA at the same parameter budget: forward+backward time and XLA temp memory.
TARGETS = {"blockwise_moe / lora": 1.3, "cellwise_moe / lora": 1.3, "localized_lora / lora": 1.15}
GPU_TARGETS = {"blockwise_moe / lora": 1.1, "cellwise_moe / lora": 1.1, "localized_lora / lora": 1.1}
TARGET_TEMP_RATIO = 2.0
F32 = 4  # bytes per float32
PAGE_BYTES = resource.getpagesize()
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters

ApplyFn = Callable[[Any, jnp.ndarray], jnp.ndarray]


# ---------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Layer and budget sizes of one run."""

  d: int  # d_in = d_out
  tokens: int  # batch of token vectors
  k: int  # K = K_y = K_x grid cells per side
  experts: int  # E
  r_lora: int  # LoRA rank; fixes the parameter budget 2 d r_lora
  dense_tokens: int  # token count of the dense per-example variant

  @property
  def r_block(self) -> int:
    """Per-cell expert rank r_b at LoRA's budget: E K^2 r_b (d/K + d/K) = 2 d r_lora -> r_lora / (E K)."""
    return self.r_lora // (self.experts * self.k)

  @property
  def r_localized(self) -> int:
    """Per-cell rank of static Localized LoRA at LoRA's budget: K^2 r (2 d / K) = 2 d r_lora -> r_lora / K."""
    return self.r_lora // self.k


def check_sizes(s: Sizes) -> None:
  """Raises a ValueError that names the fix when the sizes admit no equal-budget per-cell rank."""
  if s.d % s.k:
    raise ValueError(f"--d {s.d} is not divisible by --k {s.k}.")
  step = s.experts * s.k
  if s.r_lora % step or s.r_lora < step:
    raise ValueError(
      f"--r-lora {s.r_lora}: the equal-budget per-cell rank r_b = r_lora / (E*K) = {s.r_lora}/{step} must "
      f"be an integer >= 1; use a multiple of {step}, e.g. --r-lora {max(step, s.r_lora // step * step)}."
    )
  if s.r_block > s.d // s.k:
    raise ValueError(f"r_b={s.r_block} exceeds the cell size d/K={s.d // s.k}.")


# ---------------------------------------------------------------------------------------------------------
# Routers of the naive baselines (written independently of the library)
# ---------------------------------------------------------------------------------------------------------


def _gates_blockwise(kernel: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Global activation router (Eq. 5): softmax(x W_g), [N, E]."""
  return jax.nn.softmax(x @ kernel, axis=-1)


def _gates_cellwise(kernel: jnp.ndarray, x: jnp.ndarray, k_x: int) -> jnp.ndarray:
  """Per-cell activation routers on the local fields (Eq. 7): [N, K_y, K_x, E]."""
  xs = x.reshape(x.shape[0], k_x, -1)
  return jax.nn.softmax(jnp.einsum("njd,ijde->nije", xs, kernel), axis=-1)


# ---------------------------------------------------------------------------------------------------------
# Naive implementations (the baselines that show why the vectorised rank-space form matters)
# ---------------------------------------------------------------------------------------------------------


def routed_naive_loop(module, params, x: jnp.ndarray) -> jnp.ndarray:
  """A first research implementation: loops over output segments, input fields and experts, with slicing.

  Each (cell, expert) pair is its own rank-r_b GEMM pair, and the gate multiplies the d_out/K_y-wide
  output of every expert (not its rank-r_b code): E*K*K small, memory-bound matmuls per call.
  """
  a, b, kernel = params["A"], params["B"], params["router"]["kernel"]
  num_e, k_y, k_x, dx, _ = a.shape
  dy = b.shape[3]
  cellwise = isinstance(module, localmoe.CellWiseLoRAMoE)
  if not cellwise:
    gates = jax.nn.softmax(x @ kernel, axis=-1)  # [N, E], one global router
  segments = []
  for i in range(k_y):
    h_i = jnp.zeros((x.shape[0], dy), x.dtype)
    for j in range(k_x):
      x_j = x[:, j * dx : (j + 1) * dx]
      if cellwise:
        gates = jax.nn.softmax(x_j @ kernel[i, j], axis=-1)  # router of cell (i, j)
      for e in range(num_e):
        h_i = h_i + gates[:, e : e + 1] * ((x_j @ a[e, i, j]) @ b[e, i, j].T)
    segments.append(h_i)
  return common.scaling(module.alpha, module.rank) * jnp.concatenate(segments, axis=-1)


def routed_dense_per_example(module, params, x: jnp.ndarray) -> jnp.ndarray:
  """Builds each example's routed update Delta W_n = sum_e g_n^e B^e A^eT [d_out, d_in], then Delta W_n x_n.

  This is what mixing experts in weight space costs: N * d_out * d_in floats of activations. The
  library mixes in rank space instead (z = g * A^T x, then B z): N * E * K^2 * r_b floats.
  """
  a, b, kernel = params["A"], params["B"], params["router"]["kernel"]
  num_e, k_y, k_x, _, _ = a.shape
  if isinstance(module, localmoe.CellWiseLoRAMoE):
    gates = _gates_cellwise(kernel, x, k_x)  # [N, K_y, K_x, E]
  else:
    gates = jnp.broadcast_to(_gates_blockwise(kernel, x)[:, None, None, :], (x.shape[0], k_y, k_x, num_e))
  expert_blocks = jnp.einsum("eijor,eijdr->eijod", b, a)  # [E, K_y, K_x, o, d]
  blocks = jnp.einsum("nije,eijod->nijod", gates, expert_blocks)  # [N, K_y, K_x, o, d]
  n, _, _, o, dx = blocks.shape
  delta_w = blocks.transpose(0, 1, 3, 2, 4).reshape(n, k_y * o, k_x * dx)  # [N, d_out, d_in]
  return common.scaling(module.alpha, module.rank) * jnp.einsum("nod,nd->no", delta_w, x)


# ---------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Method:
  """One benchmarked forward function with its parameters."""

  name: str
  module: Any  # the library module (parameter layout, analytic count)
  apply: ApplyFn  # (params, x) -> [N, d_out]
  params: Any
  reference: str | None = None  # method whose loss and gradients this one must reproduce


def library_apply(module) -> ApplyFn:
  """The library forward pass as (params, x) -> output."""
  return lambda params, x: module.apply({"params": params}, x)


def adapter_specs(s: Sizes) -> dict[str, dict]:
  """`localmoe.make` specs of the four library adapters at LoRA's parameter budget."""
  grid = dict(d_in=s.d, d_out=s.d, k_y=s.k, k_x=s.k)
  routed = dict(grid, rank=s.r_block, num_experts=s.experts, router_input="activation")
  return {
    "lora": dict(method="lora", d_in=s.d, d_out=s.d, rank=s.r_lora),
    "melora": dict(method="melora", d_in=s.d, d_out=s.d, num_blocks=s.k, rank=s.r_lora),
    "localized_lora": dict(method="localized_lora", rank=s.r_localized, **grid),
    "blockwise_moe": dict(method="blockwise_moe", **routed),
    "cellwise_moe": dict(method="cellwise_moe", **routed),
  }


def init_params(module, d_in: int, seed: int) -> Any:
  """Random parameters in the module's own layout (from `jax.eval_shape(module.init)`), drawn with numpy.

  Eager `module.init` compiles every random op separately (seconds per module); only the layout matters
  here. A and router kernels get N(0, 1/fan_in), B gets N(0, 0.01^2) instead of the zeros of a fresh
  adapter, so that outputs and gradients are nonzero and the correctness checks mean something.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((2, d_in), jnp.float32))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    scale = 0.01 if path[-1].key == "B" else 1.0 / np.sqrt(leaf.shape[-2])
    return jnp.asarray(scale * rng.standard_normal(leaf.shape, dtype=np.float32))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def build_methods(s: Sizes) -> list[Method]:
  """The library adapters and the naive baselines, sharing parameters."""
  methods = []
  modules = {}
  for seed, (name, spec) in enumerate(adapter_specs(s).items()):
    module = localmoe.make(spec)
    params = init_params(module, s.d, seed)
    modules[name] = (module, params)
    methods.append(Method(name, module, library_apply(module), params))
  for name in ("blockwise_moe", "cellwise_moe"):
    module, params = modules[name]

    def bind(fn, module=module):
      return lambda p, x: fn(module, p, x)

    methods.append(Method(f"{name} [naive loop]", module, bind(routed_naive_loop), params, name))
    methods.append(Method(f"{name} [dense per-example dW]", module, bind(routed_dense_per_example), params, name))
  return methods


# ---------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------


def loss_and_grad(apply: ApplyFn) -> Callable:
  """value_and_grad of sum(apply(params, x)^2) with respect to params."""
  return jax.value_and_grad(lambda params, x: jnp.sum(jnp.square(apply(params, x))))


def _flops(compiled) -> float:
  """XLA's FLOP estimate; cost_analysis() is a dict (or, in older jax, a one-element list of dicts)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _layout_ops(hlo_text: str) -> int:
  """Top-level transposes / copies / concatenates / slices in the optimised entry computation."""
  entry = hlo_text[hlo_text.find("ENTRY") :]
  entry = entry[: entry.find("\n}")]
  pattern = re.compile(r"^\s*(?:ROOT )?%(\S+) = \S+ (\w[\w-]*)\(", re.M)
  count = 0
  for name, opcode in pattern.findall(entry):
    if opcode in ("transpose", "copy", "concatenate", "slice") or (
      opcode == "fusion" and re.search(r"transpose|copy|concatenate|slice", name)
    ):
      count += 1
  return count


def compile_method(m: Method, x: jnp.ndarray) -> dict:
  """Compiles fwd+bwd, records compile time and XLA's memory/FLOP analysis, warms up (keeping the result)."""
  t0 = time.perf_counter()
  compiled = jax.jit(loss_and_grad(m.apply)).lower(m.params, x).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  loss, grads = jax.block_until_ready(compiled(m.params, x))  # warm-up, kept for the check
  return dict(
    compiled=compiled,
    loss=loss,
    grads=grads,
    compile_s=compile_s,
    flops=_flops(compiled),
    temp_bytes=int(mem.temp_size_in_bytes),
    argument_bytes=int(mem.argument_size_in_bytes),
    output_bytes=int(mem.output_size_in_bytes),
    alias_bytes=int(mem.alias_size_in_bytes),
    layout_ops=_layout_ops(compiled.as_text()),
  )


def relative_error(got: dict, want: dict) -> float:
  """Largest relative difference of the loss and of every gradient leaf (max |diff| / max |want|)."""
  pairs = [(got["loss"], want["loss"])] + list(
    zip(jax.tree_util.tree_leaves(got["grads"]), jax.tree_util.tree_leaves(want["grads"]))
  )
  return max(float(jnp.max(jnp.abs(g - w)) / (jnp.max(jnp.abs(w)) + 1e-30)) for g, w in pairs)


def time_round_robin(methods: list[Method], info: dict[str, dict], x: jnp.ndarray, repeats: int) -> dict[str, dict]:
  """Times one call of every method per repeat, round-robin.

  Returns, per method, the median and minimum milliseconds per call and the memory newly faulted in per
  call (minor page faults x page size, from getrusage): XLA:CPU allocates its temp buffer on every call,
  and a block the allocator had returned to the OS must be faulted in (zeroed by the kernel) again.
  """
  times = {m.name: [] for m in methods}
  faults = {m.name: 0 for m in methods}
  for _ in range(repeats):
    for m in methods:
      fn = info[m.name]["compiled"]
      faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      jax.block_until_ready(fn(m.params, x))
      times[m.name].append(time.perf_counter() - t0)
      faults[m.name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
      time.sleep(SETTLE_S)  # let the runtime release this call's buffers before the next method starts
  return {
    name: dict(
      time_ms=1e3 * statistics.median(t),
      time_min_ms=1e3 * min(t),
      faulted_mb=faults[name] * PAGE_BYTES / repeats / 2**20,
    )
    for name, t in times.items()
  }


def compile_all(methods: list[Method], x: jnp.ndarray) -> dict[str, dict]:
  """Compiles (and warms up) every method; checks each against its reference method."""
  info = {m.name: compile_method(m, x) for m in methods}
  for m in methods:
    reference = info[m.reference] if m.reference is not None else None
    info[m.name]["rel_error"] = None if reference is None else relative_error(info[m.name], reference)
  return info


def result_rows(methods: list[Method], info: dict[str, dict], timing: dict[str, dict], x: jnp.ndarray) -> list[dict]:
  """One JSON-friendly result row per method."""
  rows = []
  for m in methods:
    r = info[m.name]
    rows.append(
      dict(
        method=m.name,
        params=int(m.module.num_params()),
        tokens=int(x.shape[0]),
        **timing[m.name],
        compile_s=r["compile_s"],
        gflops=r["flops"] / 1e9,
        temp_mb=r["temp_bytes"] / 2**20,
        argument_mb=r["argument_bytes"] / 2**20,
        output_mb=r["output_bytes"] / 2**20,
        layout_ops=r["layout_ops"],
        rel_error_vs_library=r["rel_error"],
      )
    )
  return rows


def keep_freed_memory() -> bool:
  """Asks glibc malloc to serve large blocks from its heap and keep freed memory (no mmap, no trim).

  By default glibc mmaps every block above 32 MB (its largest dynamic mmap threshold) and munmaps it on
  free, so an executable whose temp buffer exceeds 32 MB page-faults all of it on every call. After this
  call, blocks up to the 64 MB size of a thread arena's heap are reused; larger ones still fault.
  Irreversible for the process; returns False where this is not glibc.
  """
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
  except (OSError, AttributeError):
    return False


# ---------------------------------------------------------------------------------------------------------
# Optional per-op profile
# ---------------------------------------------------------------------------------------------------------


def profile_ops(m: Method, x: jnp.ndarray, calls: int = 5, top: int = 12) -> None:
  """Prints the XLA ops that take the most CPU time (summed over threads) in one fwd+bwd call."""
  compiled = jax.jit(loss_and_grad(m.apply)).lower(m.params, x).compile()
  profile_compiled(m.name, compiled, (m.params, x), calls, top)


def profile_compiled(name: str, compiled, args: tuple, calls: int = 5, top: int = 12) -> None:
  """Per-op time of a compiled executable over `calls` calls of `compiled(*args)`, the `top` largest,
  each with its HLO shape and the JAX op it came from."""
  describe = {}
  for line in compiled.as_text().splitlines():
    found = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ", line)
    if found and found.group(1) not in describe:
      op_name = re.search(r'op_name="([^"]*)"', line)
      describe[found.group(1)] = f"{found.group(2)}  {op_name.group(1)[-55:] if op_name else ''}"
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(calls):
      jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    trace = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(trace)
  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        if not event.name.startswith(("ThunkExecutor", "end:", "Threadpool", "SlinkyThreadPool")):
          per_op[event.name] += event.duration_ns
  total = sum(per_op.values()) / calls / 1e6
  print(f"\n  {name}: {total:.1f} ms of op CPU time per call (summed over threads)")
  for op, ns in per_op.most_common(top):
    print(f"    {ns / calls / 1e6:7.2f} ms  {op:30s} {describe.get(op, '')}")


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------


def print_table(rows: list[dict], title: str) -> None:
  """The per-method table: median and min time, both as a ratio to LoRA, memory, FLOPs and checks."""
  lora = next(r for r in rows if r["method"] == "lora")
  print(f"\n{title}")
  header = (
    f"  {'method':38s} {'params':>7s} {'fwd+bwd ms':>10s} {'x LoRA':>6s} {'min ms':>7s} "
    f"{'x LoRA':>6s} {'faulted MB':>10s} {'temp MB':>7s} {'GFLOPs':>6s} {'layout ops':>10s} "
    f"{'compile s':>9s} {'rel.err':>7s}"
  )
  print(header)
  print("  " + "-" * (len(header) - 2))
  for r in rows:
    err = "" if r["rel_error_vs_library"] is None else f"{r['rel_error_vs_library']:.0e}"
    print(
      f"  {r['method']:38s} {r['params']:7d} {r['time_ms']:10.1f} {r['time_ms'] / lora['time_ms']:6.2f} "
      f"{r['time_min_ms']:7.1f} {r['time_min_ms'] / lora['time_min_ms']:6.2f} {r['faulted_mb']:10.1f} "
      f"{r['temp_mb']:7.1f} {r['gflops']:6.2f} {r['layout_ops']:10d} {r['compile_s']:9.2f} {err:>7s}"
    )


def print_heap_table(rows: list[dict]) -> None:
  """The second timing pass, with freed memory kept by malloc (no page faults on temp buffers <= 64 MB)."""
  lora = next(r for r in rows if r["method"] == "lora")
  print(
    "\nallocator effect: the same executables after mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1), "
    "so freed temp buffers are reused instead of page-faulted in again"
  )
  header = f"  {'method':38s} {'fwd+bwd ms':>10s} {'x LoRA':>6s} {'min ms':>7s} {'x LoRA':>6s} {'faulted MB':>10s}"
  print(header)
  print("  " + "-" * (len(header) - 2))
  for r in rows:
    if "kept_time_ms" in r:
      print(
        f"  {r['method']:38s} {r['kept_time_ms']:10.1f} {r['kept_time_ms'] / lora['kept_time_ms']:6.2f} "
        f"{r['kept_time_min_ms']:7.1f} {r['kept_time_min_ms'] / lora['kept_time_min_ms']:6.2f} "
        f"{r['kept_faulted_mb']:10.1f}"
      )


def ratios(rows: list[dict], key: str = "time_ms") -> dict[str, float]:
  """Headline ratios of `key` times: library adapters / LoRA, naive loop / library."""
  t = {r["method"]: r[key] for r in rows if key in r}
  out = {
    f"{name} / lora": t[name] / t["lora"]
    for name in ("melora", "localized_lora", "blockwise_moe", "cellwise_moe")
    if name in t
  }
  for name in ("blockwise_moe", "cellwise_moe"):
    if f"{name} [naive loop]" in t:
      out[f"{name} [naive loop] / {name}"] = t[f"{name} [naive loop]"] / t[name]
  return out


def temp_ratios(rows: list[dict]) -> dict[str, float]:
  """XLA temp memory of each library adapter as a ratio to LoRA's."""
  t = {r["method"]: r["temp_mb"] for r in rows}
  return {f"{name} / lora": t[name] / t["lora"] for name in ("localized_lora", "blockwise_moe", "cellwise_moe")}


def print_header(s: Sizes, repeats: int) -> None:
  """Device, library versions and the sizes of the run."""
  print("layer_bench: forward+backward = jit(value_and_grad(sum(adapter(x)^2))) w.r.t. the adapter params")
  print(
    f"  devices: {jax.devices()}  backend: {jax.default_backend()}  jax {jax.__version__}  "
    f"cpu cores: {os.cpu_count()}  python {platform.python_version()}"
  )
  print(f"  load average (1, 5, 15 min): {os.getloadavg()} -- other processes on the machine skew timings")
  print(
    f"  sizes: d_in = d_out = {s.d}, tokens = {s.tokens}, K_y = K_x = {s.k}, E = {s.experts}, "
    f"repeats = {repeats} (median, round-robin), float32"
  )
  print(
    f"  budget: LoRA rank {s.r_lora} -> {2 * s.d * s.r_lora} params; routed per-cell rank "
    f"r_b = r_lora / (E*K) = {s.r_block} (+ router params); localized per-cell rank r_lora / K = "
    f"{s.r_localized}"
  )


def print_memory_model(s: Sizes, tokens: int) -> dict:
  """Analytic activation sizes: rank-space gate mixing versus a per-example dense routed update."""
  rank_space = tokens * s.experts * s.k * s.k * s.r_block * F32
  dense = tokens * s.d * s.d * F32
  print(
    f"  analytic routed activation at {tokens} tokens: rank space N*E*K*K*r_b*4 = "
    f"{rank_space / 2**20:.3f} MB  vs  per-example dense update N*d*d*4 = {dense / 2**20:.1f} MB "
    f"({dense / rank_space:.0f}x)"
  )
  return dict(tokens=tokens, rank_space_bytes=rank_space, dense_per_example_bytes=dense)


def targets() -> dict[str, float]:
  """The time targets of this backend (an accelerator's are tighter: routed <= 1.1x LoRA)."""
  return GPU_TARGETS if jax.default_backend() in ("gpu", "cuda", "rocm") else TARGETS


def print_ratios(tables: dict[str, dict[str, float]], temp: dict[str, float]) -> None:
  """The ratios, printed last (one column per timing statistic), and whether each target is met."""
  names = list(tables)
  print("\nratios of fwd+bwd time:")
  print(f"  {'':42s} " + " ".join(f"{n:>18s}" for n in names))
  for key in tables[names[0]]:
    cells = [f"{tables[n][key]:17.2f}x" if key in tables[n] else f"{'':18s}" for n in names]
    print(f"  {key:42s} " + " ".join(cells))
  print("ratios of XLA temp memory:")
  for key, value in temp.items():
    print(f"  {key:42s} {value:17.2f}x")
  for key, target in targets().items():
    verdicts = [f"{n} {tables[n][key]:.2f}x {'MET' if tables[n][key] <= target else 'NOT met'}" for n in names]
    print(f"  target {key} <= {target}x -- " + "; ".join(verdicts))
  for key, value in temp.items():
    print(
      f"  target temp {key} <= {TARGET_TEMP_RATIO}x -- {value:.2f}x "
      f"{'MET' if value <= TARGET_TEMP_RATIO else 'NOT met'}"
    )


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--d", type=int, help=f"layer width d_in = d_out (default {DEFAULTS['d']})")
  p.add_argument("--tokens", type=int, help=f"batch of tokens (default {DEFAULTS['tokens']})")
  p.add_argument("--k", type=int, help=f"grid cells per side K (default {DEFAULTS['k']})")
  p.add_argument("--experts", type=int, help=f"experts per cell E (default {DEFAULTS['experts']})")
  p.add_argument("--r-lora", type=int, help=f"LoRA rank, sets the budget (default {DEFAULTS['r_lora']})")
  p.add_argument("--repeats", type=int, help=f"timed calls per method (default {DEFAULTS['repeats']})")
  p.add_argument(
    "--dense-tokens",
    type=int,
    help=f"tokens for the dense per-example variant, 0 to skip (default {DEFAULTS['dense_tokens']})",
  )
  p.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke test: {QUICK}")
  p.add_argument(
    "--no-heap-pass", action="store_true", help="skip the second timing pass with glibc told to keep freed memory"
  )
  p.add_argument("--profile", action="store_true", help="print per-op CPU time of LoRA and routed layers")
  p.add_argument("--json", metavar="PATH", help="write the results as JSON")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  base = QUICK if args.quick else DEFAULTS
  pick = lambda name: base[name] if getattr(args, name) is None else getattr(args, name)
  s = Sizes(
    d=pick("d"),
    tokens=pick("tokens"),
    k=pick("k"),
    experts=pick("experts"),
    r_lora=pick("r_lora"),
    dense_tokens=pick("dense_tokens"),
  )
  repeats = pick("repeats")
  check_sizes(s)
  start = time.perf_counter()
  print_header(s, repeats)
  if args.quick:
    print("  --quick: tiny sizes, a smoke test; times are dominated by dispatch overhead, not by the layers")

  methods = build_methods(s)
  x = jax.random.normal(jax.random.key(0), (s.tokens, s.d), jnp.float32)
  main_methods = [m for m in methods if "dense" not in m.name]
  info = compile_all(main_methods, x)
  # The naive loops free hundreds of MB per call; they are timed in their own round-robin group so that
  # releasing those buffers does not slow down the method timed next.
  timing = time_round_robin([m for m in main_methods if "naive" not in m.name], info, x, repeats)
  timing.update(time_round_robin([m for m in main_methods if "naive" in m.name], info, x, repeats))
  rows = result_rows(main_methods, info, timing, x)

  # The small-batch suite with the dense per-example update (its activations are N * d * d floats).
  dense_rows, dense_methods = [], [m for m in methods if m.name in DENSE_SUITE]
  if s.dense_tokens > 0:
    x_small = x[: s.dense_tokens]
    dense_info = compile_all(dense_methods, x_small)
    dense_rows = result_rows(
      dense_methods, dense_info, time_round_robin(dense_methods, dense_info, x_small, repeats), x_small
    )

  # Second pass with freed memory kept by malloc: what the methods cost without re-faulting temp buffers.
  # Host malloc only matters where XLA's temp buffers live in host memory (the CPU backend).
  kept = not args.no_heap_pass and jax.default_backend() == "cpu" and keep_freed_memory()
  if kept:
    fast = [m for m in main_methods if "naive" not in m.name]
    timing = time_round_robin(fast, info, x, repeats)
    for row in rows:
      if row["method"] in timing:
        row.update({f"kept_{key}": value for key, value in timing[row["method"]].items()})

  print_table(rows, f"main suite: {s.tokens} tokens x d={s.d}")
  print(
    "  fwd+bwd ms: median; faulted MB: memory page-faulted in per call (minor faults); temp MB: XLA temp "
    "(activation) buffer;\n  layout ops: top-level transposes/copies/concats/slices in the optimised HLO;"
    " "
    "rel.err: loss and gradients vs the library"
  )
  memory_model = [print_memory_model(s, s.tokens)]
  if kept:
    print_heap_table(rows)
  if dense_rows:
    print_table(dense_rows, f"dense per-example update vs rank-space mixing: {s.dense_tokens} tokens")
    memory_model.append(print_memory_model(s, s.dense_tokens))

  if args.profile:
    print(
      "\nper-op profile (op CPU time summed over threads; kernel page-fault time is not attributed to ops"
      + ("; taken after the heap-kept pass" if kept else "")
      + ")"
    )
    for m in main_methods:
      if m.name in PROFILED:
        profile_ops(m, x)

  elapsed = time.perf_counter() - start
  tables = {"median": ratios(rows), "min": ratios(rows, "time_min_ms")}
  if kept:
    tables["heap kept, median"] = ratios(rows, "kept_time_ms")
  results = dict(
    sizes=dataclasses.asdict(s) | dict(r_block=s.r_block, r_localized=s.r_localized),
    repeats=repeats,
    devices=[str(d) for d in jax.devices()],
    jax_version=jax.__version__,
    load_average=os.getloadavg(),
    main=rows,
    dense=dense_rows,
    memory_model=memory_model,
    ratios=tables,
    temp_ratios=temp_ratios(rows),
    targets=targets(),
    target_temp_ratio=TARGET_TEMP_RATIO,
    elapsed_s=elapsed,
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
    print(f"\nwrote {args.json}")
  print(f"\ntotal benchmark time: {elapsed:.1f} s")
  print_ratios(tables, temp_ratios(rows))
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
