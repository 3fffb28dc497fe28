"""The trainer seam: a fork passes its step to `fit(step_fn=...)` and `step_seconds(step_fn=...)`; nothing
is looked up process-wide, so a forked step changes its own fit and no other."""

import pathlib

import jax
import numpy as np
import pytest

import localmoe as lm
from localmoe import single_layer, train
from localmoe.train import step as step_lib

SETTINGS = train.Settings(epochs=1, batch_size=32, learning_rate=3e-2)


def tiny_problem(n=64, d=4):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, d)).astype(np.float32)
  ctx = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]
  y = (x @ rng.standard_normal((d, d)).astype(np.float32)).astype(np.float32)
  split = lambda rows: {"x": x[rows], "context": ctx[rows], "y": y[rows]}
  return train.Data(train=split(slice(0, 48)), test=split(slice(48, None)), frozen={"w0": np.zeros((d, d), np.float32)})


def lora_task(d=4):
  return single_layer.layer_task(lm.make(dict(method="lora", d_in=d, d_out=d, rank=1, b_init="normal_0.01")), d, 2)


def no_update_step(task, tx, state, frozen, inputs, y, mask, global_step):
  """A fork: computes the objective but never updates the parameters."""
  _, out = step_lib.train_step(task, tx, state, frozen, inputs, y, mask, global_step)
  return state, out


@pytest.mark.slow
def test_a_forked_step_changes_its_fit_and_no_other():
  data = tiny_problem()
  forked = train.fit(lora_task(), data, [0], SETTINGS, log=None, step_fn=no_update_step)
  after = train.fit(lora_task(), data, [0], SETTINGS, log=None)  # the default step, same process
  initial = lora_task().init(jax.random.fold_in(jax.random.PRNGKey(0), 0), None)
  # The fork trained nothing (the initial state is compiled at a low optimisation level: equal to an ulp).
  np.testing.assert_allclose(np.asarray(forked.params["B"])[0], initial["B"], rtol=1e-6, atol=1e-7)
  # The next fit, given no step, trains with `train_step`: B moves by far more than an ulp.
  assert np.abs(np.asarray(after.params["B"])[0] - initial["B"]).max() > 1e-3


def test_step_seconds_times_the_given_step():
  calls = []

  def counting_step(*args):
    calls.append(1)
    return step_lib.train_step(*args)

  task, data = lora_task(), tiny_problem()
  params = jax.tree_util.tree_map(lambda a: a[None], task.init(jax.random.PRNGKey(0), None))
  batch = {k: v[:8] for k, v in data.train.items()}
  assert train.step_seconds(task, params, data.frozen, batch, 1, step_fn=counting_step) > 0
  assert calls


def test_no_process_wide_lookup_in_the_trainer():
  trainer = pathlib.Path(train.__file__).parent
  offenders = [p.name for p in trainer.glob("*.py") if "sys.modules" in p.read_text()]
  assert not offenders


def test_the_package_exports_what_a_driver_uses():
  assert all(hasattr(train, name) for name in train.__all__) and len(train.__all__) <= 14
  for gone in ("_chunked_metrics", "_evaluate", "build_epoch_fn", "blowups", "seed_keys", "log_line"):
    assert not hasattr(train, gone), gone


def test_isolated_reports_a_failure_and_lets_run_enders_through():
  from localmoe import checkpoint, runner, workdir

  lines = []
  assert runner.isolated(lambda: 3, "[a]", lines.append) == (3, None) and not lines

  def broken():
    raise KeyError("w0")

  assert runner.isolated(broken, "[b]", lines.append) == (None, "failed: KeyError: 'w0'")
  assert lines[0].startswith("[b] FAILED: KeyError: 'w0'\nTraceback")
  for stop in (workdir.ConfigMismatchError("other config"), checkpoint.Preempted("stop")):

    def ends_the_run(stop=stop):
      raise stop

    with pytest.raises(type(stop)):
      runner.isolated(ends_the_run, "[c]", lines.append)
  assert len(lines) == 1


def test_scalar_writer_writes_finite_scalars_once_per_run(tmp_path, monkeypatch):
  import sys
  import types
  from localmoe import results

  calls = []

  class FakeSummaryWriter:
    def __init__(self, logdir):
      calls.append(("open", logdir))

    def add_scalar(self, tag, value, step):
      calls.append((tag, value, step))

    def flush(self):
      pass

    def close(self):
      calls.append(("close",))

  monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
  stale = tmp_path / "tb" / "lora"
  stale.mkdir(parents=True)
  (stale / "events.old").write_text("x")
  writer = results.ScalarWriter(str(stale))
  writer.write_scalars(1, {"test/mse": 0.5, "test_per_seed/mse/seed1": float("nan")})
  writer.write_scalars(2, {"test/mse": np.float32(0.25)})
  writer.close()
  assert calls == [("open", str(stale)), ("test/mse", 0.5, 1), ("test/mse", 0.25, 2), ("close",)]
  assert not (stale / "events.old").exists()  # a rerun replaces the earlier stream
  results.ScalarWriter(None).write_scalars(1, {"a": 1.0})  # no logdir: nothing
  assert len(calls) == 4


def test_a_step_or_task_that_cannot_be_called_is_refused_before_compute():
  task, data = lora_task(), tiny_problem()
  with pytest.raises(TypeError, match=r"step_fn='train_step' is not callable"):
    train.fit(task, data, [0], SETTINGS, log=None, step_fn="train_step")
  with pytest.raises(TypeError, match=r"step_fn=None is not callable"):
    train.step_seconds(task, None, None, {}, 1, step_fn=None)
  three = lambda params, frozen, inputs: inputs["x"]
  with pytest.raises(TypeError, match=r"Task.rngs=\('gumbel',\) but Task.predict takes no 'rngs' keyword"):
    train.Task(init=task.init, predict=three, rngs=("gumbel",))
  with pytest.raises(TypeError, match=r"Task.takes_step=True but Task.predict takes no 'step' keyword"):
    train.Task(init=task.init, predict=three, takes_step=True)
  train.Task(
    init=task.init, predict=lambda params, frozen, inputs, **kw: inputs["x"], rngs=("gumbel",), takes_step=True
  )
