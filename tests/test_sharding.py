"""Sharding over (fake) devices and hosts: subprocesses with 8 CPU devices, and two local processes
joined by jax.distributed, must reproduce single-device / single-process results."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from localmoe import sharding

pytestmark = pytest.mark.slow  # every test here launches processes or trains end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code: str, devices: int = 8, timeout: int = 120, env=None):
  full_env = dict(
    os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {})
  )
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    cwd=ROOT,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_owned_slices_cover_everything_once():
  for items in (0, 1, 7, 8, 13):
    for count in (1, 2, 3):
      parts = [sharding.owned(items, i, count) for i in range(count)]
      assert sorted(sum(parts, [])) == list(range(items))
      assert max(map(len, parts)) - min(map(len, parts)) <= 1
  with pytest.raises(ValueError, match="outside"):
    sharding.owned(4, 2, 2)


def test_cluster_detection():
  assert not sharding.cluster_requested({})
  assert sharding.cluster_requested({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert sharding.cluster_requested({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"})
  assert not sharding.cluster_requested({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"})
  with pytest.raises(ValueError, match="config.sharding='pods'"):
    sharding.from_config("pods")


def test_sharded_fits_equal_single_device():
  proc = python("""
      import jax, numpy as np
      from tests.test_train import small_problem, make_task, SETTINGS
      from localmoe import train, sharding
      assert jax.local_device_count() == 8
      for n in (8, 11):                          # one per device; more entries than devices (padded)
        seeds = list(range(n))
        data = small_problem(seeds)
        lrs = [1e-3 * (1 + k % 3) for k in seeds]
        one = train.fit(make_task(), data, seeds, SETTINGS, learning_rate=lrs, log=None,
                        placement=sharding.entries(jax.local_devices()[:1]))
        placement = sharding.entries()
        many = train.fit(make_task(), data, seeds, SETTINGS, learning_rate=lrs, log=None, placement=placement)
        np.testing.assert_allclose(many.history, one.history, rtol=1e-5, atol=1e-6)
        assert many.history.shape[0] == n and len(many.status) == n
        leaf = jax.tree_util.tree_leaves(many.params)[0]
        assert leaf.shape[0] == n
      # The state really is spread: 8 entries -> one per device.
      data = small_problem(list(range(8)))
      state = train.init_state(make_task(), sharding.entries().place_data(data), list(range(8)), 1e-3, 0.0,
                               SETTINGS, sharding.entries())
      leaf = jax.tree_util.tree_leaves(state["params"])[0]
      assert len({s.device for s in leaf.addressable_shards}) == 8
      assert all(s.data.shape[0] == 1 for s in leaf.addressable_shards)
      # Data parallel: one run, batch axis over the 8 devices.
      seeds = [0, 1]
      data = small_problem(seeds)
      ref = train.fit(make_task(), data, seeds, SETTINGS, log=None)
      dp = train.fit(make_task(), data, seeds, SETTINGS, log=None, placement=sharding.data_parallel())
      np.testing.assert_allclose(dp.history, ref.history, rtol=1e-5, atol=1e-6)
      print("OK")
      """)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_data_parallel_batch_must_divide():
  proc = python("""
      from localmoe import sharding
      try:
        sharding.data_parallel().check_batch(30)
      except ValueError as e:
        print(e)
      """)
  assert "batch_size=30 must be divisible by the 8 devices" in proc.stdout, proc.stderr[-2000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, env, devices):
  cmd = [
    sys.executable,
    os.path.join(ROOT, "launch.py"),
    "--config=configs/svd_simulation.py:quick",
    "--sweep",
    f"--workdir={workdir}",
    "--config.data.num_samples=400",
  ]
  full_env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **env)
  return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_produce_the_same_sweep_summary(tmp_path):
  single = _launch(tmp_path / "one", {}, devices=1)
  out_single, _ = single.communicate(timeout=120)
  assert single.returncode == 0, out_single[-3000:]
  port = _free_port()
  procs = [
    _launch(
      tmp_path / "two",
      {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
      devices=2,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=180)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "process 1 of 2 runs 4 of them" in outs[1]
  one = json.loads((tmp_path / "one" / "sweep.json").read_text())
  two = json.loads((tmp_path / "two" / "sweep.json").read_text())
  assert two["processes"] == 2 and one["processes"] == 1
  assert [r["name"] for r in one["entries"]] == [r["name"] for r in two["entries"]]
  for a, b in zip(one["entries"], two["entries"]):
    assert a["status"] == b["status"] == "ok"
    for metric in ("test_r2", "test_mse", "train_mse"):
      np.testing.assert_allclose(a[metric], b[metric], rtol=1e-4, atol=1e-6)
  # Every entry's files were written (by the process that owns it).
  assert len(list((tmp_path / "two" / "entries").glob("*/results.json"))) == 8
