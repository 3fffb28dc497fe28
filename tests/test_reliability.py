"""Reliability: config validation before compute, workdir guard, atomic files, checkpoints and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import experiments
from configs import svd_simulation as svd_config
from localmoe import checkpoint, results, train, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_cmd(*args):
  return [sys.executable, os.path.join(ROOT, "launch.py"), *args]


def run_launch(*args, timeout=300):
  return subprocess.run(launch_cmd(*args), cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------- config validation (no compute)

BAD_CONFIGS = [
    # (override path, value, text the error must contain)
    ("experiment", "svd", "config.experiment='svd' is not a known experiment; valid: ["),
    ("method_names", "lora,lorra", "config.method_names: ['lorra'] not among the configured methods"),
    ("method_names", "", "config.method_names: empty"),
    ("optim.lr", 0.0, "config.optim.lr=0.0 must be > 0"),
    ("optim.lr", -1e-3, "config.optim.lr=-0.001 must be > 0"),
    ("optim.epochs", 0, "config.optim.epochs=0 must be a positive integer"),
    ("optim.batch_size", 0, "config.optim.batch_size=0 must be a positive integer"),
    ("optim.batch_size", 100_000, "config.optim.batch_size=100000 is larger than the training set (8000"),
    ("optim.weight_decay", -0.1, "config.optim.weight_decay=-0.1 must be >= 0"),
    ("num_seeds", 0, "config.num_seeds=0 must be a positive integer"),
    ("seed", -3, "config.seed=-3 must be >= 0"),
    ("methods.localized_lora.k_x", 3, "config.methods.localized_lora: d_in=64 is not divisible by k_x=3"),
    ("methods.localized_lora.rank", 17, "config.methods.localized_lora: rank=17 is larger than the 16x16 grid cell"),
    ("methods.cellwise_moe.top_k", 3, "config.methods.cellwise_moe: top_k=3 must lie in 1..num_experts=2"),
    ("methods.blockwise_moe.router_input", "ctx", "config.methods.blockwise_moe: router_input='ctx' is not one of"),
    ("methods.blockwise_moe.num_experts", 0, "config.methods.blockwise_moe: num_experts=0 must be a positive integer"),
    ("methods.lora.method", "loraa", "config.methods.lora: method='loraa' is not a known adapter"),
    ("methods.lora.a_init", "xavier", "config.methods.lora: a_init='xavier' is not a known initialiser"),
    ("data.spectra", "gaussian,power", "config.data.spectra: 'power' is not known"),
    ("data.contexts", "block_diagonal,diagonal", "config.data.contexts: 'diagonal' is not a known topology"),
    ("data.test_fraction", 1.5, "config.data.test_fraction=1.5 must lie in (0, 1)"),
    ("checkpoint_every_epochs", -1, "config.checkpoint_every_epochs=-1 must be >= 0"),
]


def _set(config, path, value):
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.unlocked() if hasattr(node, "unlocked") else _null():
    node[leaf] = value


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


@pytest.mark.parametrize("path,value,message", BAD_CONFIGS, ids=[f"{p}={v}" for p, v, _ in BAD_CONFIGS])
def test_bad_config_is_one_clear_error_before_compute(path, value, message):
  config = svd_config.get_config()
  _set(config, path, value)
  with pytest.raises(ValueError) as info:
    experiments.validate(config)
  assert message in str(info.value), str(info.value)


def test_context_router_called_without_context_is_clear():
  import jax
  import jax.numpy as jnp
  import localmoe as lm
  m = lm.make(dict(method="blockwise_moe", d_in=8, d_out=8, k_y=2, k_x=2, rank=1, num_experts=2, context_dim=2))
  with pytest.raises(ValueError, match="called without a context: pass context="):
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))


def test_cli_error_writes_nothing(tmp_path):
  target = tmp_path / "run"
  proc = run_launch("--config=configs/svd_simulation.py:quick", f"--workdir={target}",
                    "--config.methods.localized_lora.rank=17")
  assert proc.returncode == 2
  assert "config.methods.localized_lora: rank=17" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not target.exists()


# ------------------------------------------------------------------------- workdir guard


def test_finished_run_is_not_overwritten(tmp_path):
  (tmp_path / "results.json").write_text("{}")
  with pytest.raises(workdir.WorkdirError, match="already holds a finished run.*--overwrite"):
    with workdir.guard(str(tmp_path)):
      pass
  (tmp_path / "checkpoints").mkdir()
  with workdir.guard(str(tmp_path), overwrite=True):
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / "checkpoints").exists()


def test_second_process_is_refused_and_stale_lock_cleared(tmp_path, capsys):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
  try:
    import socket
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
    with pytest.raises(workdir.WorkdirError, match=f"in use by process {sleeper.pid}"):
      with workdir.guard(str(tmp_path)):
        pass
  finally:
    sleeper.kill()
    sleeper.wait()
  # The process is dead now: its lock is stale and gets cleared.
  with workdir.guard(str(tmp_path)):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert "stale lock" in capsys.readouterr().out
  assert not (tmp_path / ".lock").exists()


def test_atomic_write_never_leaves_partial_files(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  results.write_json(str(path), {"a": 1})

  def broken_replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", broken_replace)
  with pytest.raises(OSError):
    results.write_json(str(path), {"a": 2})
  monkeypatch.undo()
  assert json.loads(path.read_text()) == {"a": 1}            # the old file is intact
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]   # no temp files left


# ------------------------------------------------------------------------- checkpoints and resume


def test_checkpointer_round_trip_and_resume_in_process(tmp_path):
  from tests.test_train import make_task, small_problem
  data = small_problem([0, 1])
  settings = train.Settings(epochs=4, batch_size=32, learning_rate=3e-3)
  full = train.fit(make_task(), data, [0, 1], settings, log=None)
  # Stop after epoch 2 (as a preemption would), then resume from the checkpoint.
  checkpoint.request_stop("test")
  try:
    with pytest.raises(checkpoint.Preempted):
      checkpoint.fit_with_checkpoints(make_task(), data, [0, 1], settings, directory=str(tmp_path),
                                      every_epochs=0, log=None)
  finally:
    checkpoint._STOP.clear()
  assert checkpoint.Checkpointer(str(tmp_path)).latest_epoch() == 1
  resumed = checkpoint.fit_with_checkpoints(make_task(), data, [0, 1], settings, directory=str(tmp_path),
                                            every_epochs=0, log=None)
  np.testing.assert_array_equal(resumed.history, full.history)


def test_sigterm_mid_run_then_resume_is_bit_identical(tmp_path):
  args = ["--config=configs/svd_simulation.py:quick,methods=lora+cellwise_moe,spectra=gaussian",
          "--config.data.num_samples=6000", "--config.optim.batch_size=8", "--config.optim.epochs=6",
          "--config.checkpoint_every_epochs=1"]
  reference = tmp_path / "reference"
  proc = run_launch(*args, f"--workdir={reference}")
  assert proc.returncode == 0, proc.stderr[-2000:]

  interrupted = tmp_path / "interrupted"
  child = subprocess.Popen(launch_cmd(*args, f"--workdir={interrupted}"), cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  marker = interrupted / "checkpoints" / "gaussian" / "lora"
  deadline = time.time() + 120
  while time.time() < deadline and not (marker.exists() and any(p.name.isdigit() for p in marker.iterdir())):
    time.sleep(0.02)
  child.send_signal(signal.SIGTERM)
  out, err = child.communicate(timeout=120)
  assert child.returncode == checkpoint.EXIT_PREEMPTED, err[-2000:]
  assert "Resume with the same command" in err
  assert not (interrupted / "results.json").exists()
  assert not (interrupted / ".lock").exists()

  proc = run_launch(*args, f"--workdir={interrupted}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resuming from the checkpoint at epoch" in proc.stdout
  want = json.loads((reference / "results.json").read_text())["methods"]
  got = json.loads((interrupted / "results.json").read_text())["methods"]
  for name in want:
    assert got[name]["test_r2"] == want[name]["test_r2"]
    assert got[name]["test_mse"] == want[name]["test_mse"]
  assert (interrupted / "history.csv").read_text() == (reference / "history.csv").read_text()
