"""Reliability: config validation before compute, workdir guard, atomic files, checkpoints and resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import experiments
from configs import svd_simulation as svd_config
from localmoe import checkpoint, results, train, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_cmd(*args):
  return [sys.executable, os.path.join(ROOT, "launch.py"), *args]


def run_launch(*args, timeout=300, env=None):
  return subprocess.run(
    launch_cmd(*args),
    cwd=ROOT,
    env=env or dict(os.environ, PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# Loaded by the child through a sitecustomize.py on its PYTHONPATH: right after the first checkpoint saved in a
# directory containing $SIGTERM_AFTER, the process sends itself SIGTERM. The signal arrives mid-run at a fixed
# point whatever the machine's speed (a parent polling for the checkpoint can be too late on a fast machine).
_SELF_SIGTERM = """
import os
import signal

from localmoe import checkpoint

_save = checkpoint.Checkpointer.save
_sent = []


def _save_then_signal(self, fit_state):
  saved = _save(self, fit_state)
  if saved and not _sent and os.environ["SIGTERM_AFTER"] in str(self.directory):
    _sent.append(fit_state.epoch)
    os.kill(os.getpid(), signal.SIGTERM)
  return saved


checkpoint.Checkpointer.save = _save_then_signal
"""


def run_launch_with_sigterm(tmp_path, after: str, *args):
  """launch.py `args`, SIGTERM sent by the child itself after its first checkpoint under a path containing
  `after`; asserts that the signal was received and the run stopped with the preemption exit code."""
  hook = tmp_path / "sigterm_hook"
  hook.mkdir(exist_ok=True)
  (hook / "sitecustomize.py").write_text(_SELF_SIGTERM)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), ROOT]), SIGTERM_AFTER=after)
  proc = run_launch(*args, env=env)
  assert "[preemption] SIGTERM received" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.returncode == checkpoint.EXIT_PREEMPTED, proc.stdout[-2000:] + proc.stderr[-2000:]
  return proc


# ------------------------------------------------------------------------- config validation (no compute)

BAD_CONFIGS = [
  # (override path, value, text the error must contain)
  ("experiment", "svd", "config.experiment='svd' is not a known experiment"),
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
  ("adapter.alpha", 0.0, "config.adapter.alpha=0.0 must be > 0"),
  ("optim.lr", float("inf"), "config.optim.lr=inf must be > 0 and finite"),
  ("optim.eval_every", 0, "config.optim.eval_every=0 must be a positive integer"),
  ("optim.lr_decay", 0.5, "config.optim has unknown key(s) ['lr_decay'] that the trainer would ignore; valid: ["),
  ("data.spectrum_decay", 0.0, "config.data.spectrum_decay=0.0 must be > 0"),
  ("data.k", 5, "config.data.k=5 must divide config.data.d=64"),
  ("data.num_samples", 0, "config.data.num_samples=0 must be an integer >= 2"),
  (
    "methods.cellwise_moe.context_dim",
    5,
    "config.methods.cellwise_moe.context_dim=5 disagrees with the data (context_dim=3)",
  ),
  ("sharding", "model", "config.sharding='model' is not known; valid: 'entries'"),
  ("optim.epochs", 1_000_000_000, "of history needs about"),
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


@pytest.mark.slow
def test_config_file_and_arg_errors_are_one_line(tmp_path):
  from localmoe import configlib

  (tmp_path / "broken.py").write_text("def get_config(arg=None):\n  return (\n")
  (tmp_path / "empty.py").write_text("X = 1\n")
  cases = [
    (str(tmp_path / "missing.py"), "missing.py: no such file"),
    (str(tmp_path / "broken.py"), "broken.py: syntax error at line"),
    (str(tmp_path / "empty.py"), "empty.py defines no get_config(arg=None)"),
    ("configs/svd_simulation.py:quick=ture", "config arg quick='ture' is not a boolean: use quick=true"),
    ("configs/svd_simulation.py:seeds=two", "config arg seeds='two' is not an integer"),
  ]
  for spec, message in cases:
    problem = configlib.check_config_file(["launch.py", f"--config={spec}"])
    assert problem and message in problem and "\n" not in problem, (spec, problem)
  assert configlib.check_config_file(["launch.py", "--config=configs/svd_simulation.py:quick=false"]) is None
  proc = run_launch(f"--config={tmp_path / 'missing.py'}", f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()


def test_bad_workdirs_and_locks_are_one_line_errors(tmp_path):
  (tmp_path / "a_file").write_text("")
  for path, message in [
    ("", "--workdir is empty"),
    (str(tmp_path / "a_file"), "is a file, not a directory"),
    (str(tmp_path / "a_file" / "run"), "which is a file"),
  ]:
    with pytest.raises(workdir.WorkdirError, match=message):
      with workdir.guard(path):
        pass
  for content in ("", "{not json", '{"host": "x"}'):
    (tmp_path / "locked").mkdir(exist_ok=True)
    (tmp_path / "locked" / ".lock").write_text(content)
    with pytest.raises(workdir.WorkdirError, match=r"lock file .*\.lock is empty or garbled.*delete"):
      with workdir.guard(str(tmp_path / "locked")):
        pass
  # Orphan temp files of a killed atomic write are removed when the workdir is next used.
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / ".tmp-abc123results.json").write_text("{")
  with workdir.guard(str(tmp_path / "run")):
    assert not (tmp_path / "run" / ".tmp-abc123results.json").exists()


def test_results_files_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    results.write_json(str(tmp_path / "results.json"), {"a": 1})
  finally:
    os.umask(old)
  assert (os.stat(tmp_path / "results.json").st_mode & 0o777) == 0o644


def test_context_router_called_without_context_is_clear():
  import jax
  import jax.numpy as jnp
  import localmoe as lm

  m = lm.make(dict(method="blockwise_moe", d_in=8, d_out=8, k_y=2, k_x=2, rank=1, num_experts=2, context_dim=2))
  with pytest.raises(ValueError, match="called without a context: pass context="):
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))


@pytest.mark.slow
def test_cli_error_writes_nothing(tmp_path):
  target = tmp_path / "run"
  proc = run_launch(
    "--config=configs/svd_simulation.py:quick", f"--workdir={target}", "--config.methods.localized_lora.rank=17"
  )
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


@pytest.mark.slow
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
  assert json.loads(path.read_text()) == {"a": 1}  # the old file is intact
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp files left


# ------------------------------------------------------------------------- checkpoints and resume


@pytest.mark.slow
def test_checkpointer_round_trip_and_resume_in_process(tmp_path):
  from tests.test_train import make_task, small_problem

  data = small_problem([0, 1])
  settings = train.Settings(epochs=4, batch_size=32, learning_rate=3e-3)
  full = train.fit(make_task(), data, [0, 1], settings, log=None)
  # Stop after epoch 2 (as a preemption would), then resume from the checkpoint.
  policy = checkpoint.Policy(str(tmp_path), every_epochs=0, config={"run": 1})
  checkpoint.request_stop("test")
  try:
    with pytest.raises(checkpoint.Preempted, match="checkpoint saved at epoch 1"):
      train.fit(make_task(), data, [0, 1], settings, checkpoints=policy, log=None)
  finally:
    checkpoint.clear_stop()
  assert checkpoint.Checkpointer(str(tmp_path)).latest_epoch() == 1
  lines = []
  resumed = train.fit(make_task(), data, [0, 1], settings, checkpoints=policy, log=lines.append)
  assert any("resuming from the checkpoint at epoch 1/4" in line for line in lines)
  np.testing.assert_array_equal(resumed.history, full.history)
  np.testing.assert_array_equal(resumed.train_history, full.train_history)
  # The same directory under another config is refused, naming the field.
  with pytest.raises(workdir.ConfigMismatchError, match="run: 1 -> 2.*--overwrite"):
    train.fit(
      make_task(), data, [0, 1], settings, checkpoints=checkpoint.Policy(str(tmp_path), 0, {"run": 2}), log=None
    )
  # Without a directory a stop request still ends the fit, saving nothing.
  checkpoint.request_stop("test")
  try:
    with pytest.raises(checkpoint.Preempted, match="nothing saved"):
      train.fit(make_task(), data, [0, 1], settings, log=None)
  finally:
    checkpoint.clear_stop()


# ------------------------------------------------------------------------- checkpoints belong to their config


def test_unfinished_workdir_under_another_config_is_refused_before_compute(tmp_path):
  config = svd_config.get_config("quick")
  run = tmp_path / "run"
  with workdir.guard(str(run), config=config):  # a run that crashed after its first checkpoint
    (run / "checkpoints" / "gaussian" / "lora").mkdir(parents=True)
  assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 1e-3
  changed = svd_config.get_config("quick")
  changed.num_seeds, changed.optim.lr = 3, 0.1
  with pytest.raises(workdir.ConfigMismatchError) as info:
    with workdir.guard(str(run), config=changed):
      pass
  message = str(info.value)
  assert "num_seeds: 2 -> 3" in message and "optim.lr: 0.001 -> 0.1" in message
  assert "--overwrite" in message and "another --workdir" in message
  # Fields that only say how often to log or checkpoint may change on resume.
  relaxed = svd_config.get_config("quick")
  relaxed.checkpoint_every_epochs = 1
  with workdir.guard(str(run), config=relaxed):
    pass
  # --overwrite clears the checkpoints of an unfinished run too, then records the new config.
  with workdir.guard(str(run), overwrite=True, config=changed):
    assert not (run / "checkpoints").exists()
  assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.1


@pytest.mark.slow
def test_cli_resume_under_another_config_exits_2_with_the_fields(tmp_path):
  run = tmp_path / "run"
  with workdir.guard(str(run), config=svd_config.get_config("quick")):
    (run / "checkpoints").mkdir()
  proc = run_launch("--config=configs/svd_simulation.py:quick", f"--workdir={run}", "--config.optim.lr=0.1")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "optim.lr: 0.001 -> 0.1" in proc.stderr and "Traceback" not in proc.stderr
  assert not (run / "results.json").exists()


# ------------------------------------------------------------------------- failures that fail


def _stopped_fit(tmp_path, epochs=3, stop_at=2):
  """A fit with checkpoints every epoch, stopped after `stop_at` epochs (as a preemption would)."""
  from tests.test_train import make_task, small_problem

  data = small_problem([0])
  settings = train.Settings(epochs=epochs, batch_size=32, learning_rate=3e-3)
  policy = checkpoint.Policy(str(tmp_path / "ckpt"), every_epochs=1, config={"run": 1})

  def stop(fit_state):
    if fit_state.epoch == stop_at:
      checkpoint.request_stop("test")

  try:
    with pytest.raises(checkpoint.Preempted):
      train.fit(make_task(), data, [0], settings, checkpoints=policy, on_epoch_end=stop, log=None)
  finally:
    checkpoint.clear_stop()
  return make_task, data, settings, policy


def _corrupt(step_dir):
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_to_the_previous_step_then_retrains(tmp_path):
  make_task, data, settings, policy = _stopped_fit(tmp_path)
  full = train.fit(make_task(), data, [0], settings, log=None)
  _corrupt(tmp_path / "ckpt" / "2")
  lines = []
  resumed = train.fit(make_task(), data, [0], settings, checkpoints=policy, log=lines.append)
  text = "\n".join(lines)
  assert f"checkpoint {tmp_path / 'ckpt' / '2'} is unreadable" in text
  assert "falling back to the checkpoint at epoch 1" in text and "resuming from the checkpoint at epoch 1/3" in text
  np.testing.assert_array_equal(resumed.history, full.history)
  # Every step corrupt: the fit says so and retrains from epoch 0.
  for step in os.listdir(tmp_path / "ckpt"):
    if step.isdigit():
      _corrupt(tmp_path / "ckpt" / step)
  lines = []
  again = train.fit(make_task(), data, [0], settings, checkpoints=policy, log=lines.append)
  assert any("retraining this fit from epoch 0" in line for line in lines)
  np.testing.assert_array_equal(again.history, full.history)


@pytest.mark.slow
def test_unusable_checkpoint_dir_and_failed_save_warn_and_keep_training(tmp_path, monkeypatch):
  from tests.test_train import make_task, small_problem

  data = small_problem([0])
  settings = train.Settings(epochs=2, batch_size=32, learning_rate=3e-3)
  (tmp_path / "a_file").write_text("")
  lines = []
  fit = train.fit(
    make_task(),
    data,
    [0],
    settings,
    log=lines.append,
    checkpoints=checkpoint.Policy(str(tmp_path / "a_file" / "ckpt"), every_epochs=1),
  )
  assert fit.status == ["ok"]
  assert any("WARNING: cannot use checkpoint directory" in line for line in lines)

  def broken_save(self, *args, **kwargs):
    raise OSError("No space left on device")

  import orbax.checkpoint as ocp

  monkeypatch.setattr(ocp.CheckpointManager, "save", broken_save)
  lines = []
  fit = train.fit(
    make_task(),
    data,
    [0],
    settings,
    log=lines.append,
    checkpoints=checkpoint.Policy(str(tmp_path / "ckpt"), every_epochs=1),
  )
  assert fit.status == ["ok"] and np.all(np.isfinite(fit.history))
  assert sum("saving the checkpoint at epoch" in line and "No space left" in line for line in lines) == 2


@pytest.mark.slow
def test_failed_method_exits_nonzero_is_not_finished_and_keeps_the_others(tmp_path, monkeypatch, capsys):
  from experiments import svd_simulation

  config = svd_config.get_config("quick,methods=lora+cellwise_moe")
  config.data.num_samples, config.data.spectra = 400, "gaussian"
  real_fit = train.fit

  def fit_that_cannot_allocate(task, data, seeds, settings, *, name="model", **kwargs):
    if name == "lora":
      raise MemoryError("Unable to allocate 7.45 TiB for an array")
    return real_fit(task, data, seeds, settings, name=name, **kwargs)

  monkeypatch.setattr(train, "fit", fit_that_cannot_allocate)
  with pytest.raises(results.RunFailed, match=r"1 of 2 method\(s\) failed \(lora: failed: MemoryError"):
    svd_simulation.run(config, str(tmp_path))
  assert not (tmp_path / "results.json").exists() and not workdir.is_finished(str(tmp_path))
  assert "failed: MemoryError" in (tmp_path / "results.md").read_text()
  monkeypatch.undo()
  capsys.readouterr()
  svd_simulation.run(config, str(tmp_path))
  lines = capsys.readouterr().out.splitlines()
  assert any("[cellwise_moe] resuming from the checkpoint at epoch 2/2" in line for line in lines)
  assert not any("[lora] resuming" in line for line in lines)
  assert json.loads((tmp_path / "results.json").read_text())["methods"]["lora"]["status"] == "ok"


# ------------------------------------------------------------------------- preemption on every fit path


def _interrupt_then_resume(tmp_path, args, after):
  """Runs `args` to the end (reference), then again with SIGTERM right after the first checkpoint saved under
  a path containing `after`, then resumes; returns (reference, resumed) workdirs."""
  reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
  proc = run_launch(*args, f"--workdir={reference}")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  err = run_launch_with_sigterm(tmp_path, after, *args, f"--workdir={interrupted}").stderr
  assert "checkpoint saved at epoch" in err and "Resume with the same command" in err
  assert not (interrupted / ".lock").exists()
  assert not (interrupted / "results.json").exists() and not (interrupted / "sweep.json").exists()
  proc = run_launch(*args, f"--workdir={interrupted}")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "resuming from the checkpoint at epoch" in proc.stdout
  return reference, interrupted


@pytest.mark.slow
def test_sigterm_stops_a_sweep_with_75_and_the_resume_is_bit_identical(tmp_path):
  args = [
    "--config=configs/svd_simulation.py:quick",
    "--sweep",
    "--config.data.num_samples=600",
    "--config.optim.batch_size=8",
    "--config.optim.epochs=3",
    "--config.checkpoint_every_epochs=1",
  ]
  reference, resumed = _interrupt_then_resume(tmp_path, args, "group_")
  drop = lambda row: {k: v for k, v in row.items() if k != "wall_time_s"}
  want = json.loads((reference / "sweep.json").read_text())["entries"]
  got = json.loads((resumed / "sweep.json").read_text())["entries"]
  assert [drop(r) for r in got] == [drop(r) for r in want]
  assert all(r["status"] == "ok" for r in got)


@pytest.mark.slow
def test_sigterm_stops_the_nonconvex_run_with_75_and_the_resume_is_bit_identical(tmp_path):
  args = [
    "--config=configs/nonconvex_regression.py:quick,methods=lora",  # pretraining, then one method stopped
    "--config.optim.epochs=6",
    "--config.optim.eval_every=2",
    "--config.checkpoint_every_epochs=2",
    "--config.data.plot_grid=0",
  ]
  reference, resumed = _interrupt_then_resume(tmp_path, args, os.sep + "lora")
  want = json.loads((reference / "results.json").read_text())["variants"]
  got = json.loads((resumed / "results.json").read_text())["variants"]
  for scheme in want:
    assert got[scheme]["per_function"] == want[scheme]["per_function"]
  assert (resumed / "history.csv").read_text() == (reference / "history.csv").read_text()


@pytest.mark.slow
def test_history_and_tensorboard_stream_during_training_without_duplicates_after_resume(tmp_path):
  from tests.test_train import make_task, small_problem

  data = small_problem([0])
  settings = train.Settings(epochs=3, batch_size=32, learning_rate=3e-3)
  policy = checkpoint.Policy(str(tmp_path / "checkpoints"), every_epochs=1)
  live = results.Live(str(tmp_path))
  hook = live.hook("lora", [0], data.splits, train.METRICS)
  seen = []

  def stream_then_stop(fit_state):
    hook(fit_state)
    seen.append(len((tmp_path / "history.csv").read_text().strip().splitlines()) - 1)
    if fit_state.epoch == 2:
      checkpoint.request_stop("test")

  try:
    with pytest.raises(checkpoint.Preempted):
      train.fit(make_task("lora"), data, [0], settings, checkpoints=policy, on_epoch_end=stream_then_stop, log=None)
  finally:
    checkpoint.clear_stop()
  live.close()
  assert seen == [2, 4]  # rows (epochs x splits) on disk after each epoch
  assert len(os.listdir(tmp_path / "tb" / "lora")) == 1
  live = results.Live(str(tmp_path))
  fit = train.fit(
    make_task("lora"),
    data,
    [0],
    settings,
    checkpoints=policy,
    on_epoch_end=live.hook("lora", [0], data.splits, train.METRICS),
    log=None,
  )
  live.close()
  assert len((tmp_path / "history.csv").read_text().strip().splitlines()) == 1 + 3 * 2
  assert len(os.listdir(tmp_path / "tb" / "lora")) == 1  # the resumed run rewrote its event file
  results.write_tensorboard(str(tmp_path / "tb"), "lora", [0], fit)
  assert len(os.listdir(tmp_path / "tb" / "lora")) == 1
