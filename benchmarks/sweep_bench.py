r"""Sweep throughput: a 32-entry SVD sweep vectorised (one vmapped program) vs one entry at a time, and
N devices vs 1.

  python benchmarks/sweep_bench.py                       # this machine's devices
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sweep_bench.py   # fake CPU devices
  python benchmarks/sweep_bench.py --epochs 3 --samples 10000 --method cellwise_moe

The sweep: one method x 8 seeds x 4 learning rates (same shapes: one group), each entry with its own data
replicate (the SVD experiment's seeds), `--epochs` epochs. Three timings, all in this one run:
  sequential   32 separate `train.fit` calls, one entry each (what 32 launches would do; each compiles)
  vectorised   one `train.fit` over the 32 entries (one compile), on one device
  N devices    the same, entry axis sharded over all local devices (only if there are several)
Printed: wall time per entry for each and the ratios. Compile time is included (it is part of a real
sweep); `--warm` also reports the sequential figure with compilation excluded (the second epoch onwards).
On a shared CPU the figures are noisy: run it twice.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import svd_simulation as svd_config  # noqa: E402
from experiments import svd_simulation  # noqa: E402
from localmoe import sharding, sweep, train  # noqa: E402


def jobs_and_data(method: str, epochs: int, samples: int):
  base = svd_config.get_config(None)
  base.optim.epochs = epochs
  base.data.num_samples = samples
  overrides = [
    {"method_names": method, "num_seeds": 1, "seed": s, "optim.lr": lr, "data.spectra": "gaussian"}
    for lr in (3e-4, 1e-3, 2e-3, 3e-3)
    for s in range(8)
  ]
  entries = sweep.expand(base, overrides, "/unused")
  jobs = [svd_simulation.sweep_job(e.config) for e in entries]
  assert len({j.key for j in jobs}) == 1, "the benchmark sweep must be one shape group"
  return jobs, [j.get_data() for j in jobs]


def fit(jobs, datas, placement=None, epoch_times=None):
  """One train.fit over `jobs`; appends the wall clock after every epoch to `epoch_times` if given."""
  data = sweep.stack_data(datas)
  hook = None if epoch_times is None else (lambda fs: epoch_times.append(time.perf_counter()))
  result = train.fit(
    jobs[0].task,
    data,
    [j.seed for j in jobs],
    jobs[0].settings,
    learning_rate=[j.learning_rate for j in jobs],
    weight_decay=[j.weight_decay for j in jobs],
    placement=placement,
    log=None,
    on_epoch_end=hook,
  )
  jax.block_until_ready(result.params)
  return result


def steady_epoch_s(epoch_times) -> float:
  """Mean wall time of epochs 2.. (epoch 1 includes compilation)."""
  return float(np.mean(np.diff(epoch_times)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="cellwise_moe")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--samples", type=int, default=10_000)
  parser.add_argument("--sequential", type=int, default=32, help="entries timed one at a time (<= 32)")
  parser.add_argument("--warm", action="store_true", help="also time sequential entries without compilation")
  args = parser.parse_args()

  jobs, datas = jobs_and_data(args.method, args.epochs, args.samples)
  n = len(jobs)
  devices = jax.local_devices()
  print(
    f"{n}-entry SVD sweep ({args.method}, {args.samples} samples, {args.epochs} epochs); "
    f"{len(devices)} {devices[0].platform} device(s): {devices[0].device_kind}",
    flush=True,
  )

  t = time.perf_counter()
  vec_epochs = []
  vec = fit(jobs, datas, sharding.entries(devices[:1]), vec_epochs)
  vec_s = time.perf_counter() - t
  vec_epoch = steady_epoch_s(vec_epochs)
  print(
    f"vectorised, 1 device: {vec_s:.2f} s total, {vec_s / n * 1e3:.1f} ms per entry "
    f"(compiled epochs: {vec_epoch / n * 1e3:.1f} ms per entry-epoch)",
    flush=True,
  )

  k = min(args.sequential, n)
  t = time.perf_counter()
  seq = [fit([jobs[i]], [datas[i]]) for i in range(k)]
  seq_s = (time.perf_counter() - t) / k
  print(f"sequential ({k} entries timed): {seq_s * 1e3:.1f} ms per entry (compile included)", flush=True)
  np.testing.assert_allclose(np.stack([r.history[0] for r in seq]), vec.history[:k], rtol=1e-3, atol=1e-5)
  print(f"  -> vectorised is {seq_s / (vec_s / n):.1f}x faster per entry than sequential", flush=True)

  if args.warm:
    settings = jobs[0].settings
    warm = []
    for i in range(min(4, k)):
      epoch_times = []
      fit([jobs[i]], [datas[i]], None, epoch_times)
      warm.append(steady_epoch_s(epoch_times))
    print(
      f"compiled epochs only: sequential {np.mean(warm) * 1e3:.1f} ms per entry-epoch vs vectorised "
      f"{vec_epoch / n * 1e3:.1f} -> {np.mean(warm) / (vec_epoch / n):.2f}x (settings.epochs={settings.epochs})",
      flush=True,
    )

  if len(devices) > 1:
    fit(jobs, datas, sharding.entries())  # compile once, then time
    t = time.perf_counter()
    many = fit(jobs, datas, sharding.entries())
    many_s = time.perf_counter() - t
    t = time.perf_counter()
    fit(jobs, datas, sharding.entries(devices[:1]))
    one_s = time.perf_counter() - t
    np.testing.assert_allclose(many.history, vec.history, rtol=1e-4, atol=1e-6)
    print(
      f"{len(devices)} devices vs 1 (compiled, vectorised): {many_s:.2f} s vs {one_s:.2f} s -> "
      f"{one_s / many_s:.2f}x throughput ({n / many_s:.1f} vs {n / one_s:.1f} entries/s)",
      flush=True,
    )


if __name__ == "__main__":
  main()
