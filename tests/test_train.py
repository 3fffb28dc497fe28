"""The shared trainer: determinism, vmapped seeds, divergence guard, metrics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import localmoe as lm
from localmoe import metrics, single_layer, train
from localmoe.train import evaluation, optimizer


def small_problem(seeds=(0, 1, 2), n=256, d=8):
  rng = np.random.default_rng(0)
  per = []
  for s in seeds:
    r = np.random.default_rng(s)
    x = r.standard_normal((n, d)).astype(np.float32)
    ctx = np.eye(2, dtype=np.float32)[r.integers(0, 2, n)]
    w = r.standard_normal((2, d, d)).astype(np.float32) / np.sqrt(d)
    y = np.einsum("nc,cod,nd->no", ctx, w, x).astype(np.float32)
    per.append(
      (
        {"x": x[:200], "context": ctx[:200], "y": y[:200]},
        {"x": x[200:], "context": ctx[200:], "y": y[200:]},
        0.01 * r.standard_normal((d, d)),
      )
    )
  del rng
  stack = lambda k: {key: np.stack([p[k][key] for p in per]) for key in per[0][k]}
  return train.Data(
    train=stack(0), test=stack(1), frozen={"w0": np.stack([p[2] for p in per]).astype(np.float32)}, per_seed=True
  )


def make_task(method="cellwise_moe", d=8):
  spec = dict(method=method, d_in=d, d_out=d, rank=2)
  if method != "lora":
    spec.update(k_y=2, k_x=2, num_experts=2, context_dim=2)
  return single_layer.layer_task(lm.make(spec), d, 2)


SETTINGS = train.Settings(epochs=3, batch_size=32, learning_rate=3e-3, log_every=1)


@pytest.mark.slow
def test_vmapped_seeds_equal_each_seed_alone():
  seeds = [0, 1, 2]
  data = small_problem(seeds)
  together = train.fit(make_task(), data, seeds, SETTINGS, log=None)
  for k, seed in enumerate(seeds):
    alone_data = train.Data(
      train={n: a[k : k + 1] for n, a in data.train.items()},
      test={n: a[k : k + 1] for n, a in data.test.items()},
      frozen={"w0": data.frozen["w0"][k : k + 1]},
      per_seed=True,
    )
    alone = train.fit(make_task(), alone_data, [seed], SETTINGS, log=None)
    np.testing.assert_allclose(alone.history[0], together.history[k], rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_training_is_deterministic_and_learns():
  data = small_problem([0, 1])
  a = train.fit(make_task(), data, [0, 1], SETTINGS, log=None)
  b = train.fit(make_task(), data, [0, 1], SETTINGS, log=None)
  np.testing.assert_array_equal(a.history, b.history)
  assert np.all(a.curve("train", "mse")[:, -1] < a.curve("train", "mse")[:, 0])
  assert a.status == ["ok", "ok"]


@pytest.mark.slow
def test_different_seeds_differ():
  data = small_problem([0, 0])
  r = train.fit(make_task(), data, [0, 1], SETTINGS, log=None)
  assert not np.allclose(r.history[0], r.history[1])


@pytest.mark.slow
def test_per_entry_learning_rates():
  data = small_problem([0, 0])
  r = train.fit(make_task(), data, [0, 0], SETTINGS, learning_rate=[1e-3, 1e-2], log=None)
  # Same seed and data: only the learning rate differs, so the runs must differ.
  assert not np.allclose(r.history[0], r.history[1])
  same = train.fit(make_task(), data, [0, 0], SETTINGS, learning_rate=[1e-3, 1e-3], log=None)
  np.testing.assert_array_equal(same.history[0], same.history[1])


def test_non_finite_loss_stops_only_that_entry():
  data = small_problem([0, 1])
  # A huge learning rate on entry 1 only makes it diverge; entry 0 must train normally.
  lines = []
  r = train.fit(
    make_task("lora"),
    data,
    [0, 1],
    train.Settings(epochs=4, batch_size=32, learning_rate=1e-3),
    learning_rate=[1e-3, 1e30],
    log=lines.append,
  )
  assert r.status[0] == "ok"
  assert r.status[1].startswith("diverged at epoch")
  assert np.all(np.isfinite(r.history[0]))
  assert any("seed 1: non-finite loss at epoch" in line for line in lines)


def test_r2_definition():
  y = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]], np.float32)
  pred = y + np.array([[0.1, -1.0], [0.0, 1.0], [-0.1, 0.0]], np.float32)
  sse = np.sum((pred - y) ** 2)
  sst = np.sum((y - y.mean(0)) ** 2)  # around each coordinate's mean
  np.testing.assert_allclose(metrics.r2(jnp.asarray(pred), jnp.asarray(y)), 1 - sse / sst, rtol=1e-6)
  np.testing.assert_allclose(metrics.mse(jnp.asarray(pred), jnp.asarray(y)), sse / y.size, rtol=1e-6)


@pytest.mark.slow
def test_chunked_evaluation_equals_whole_split():
  data = small_problem([0])
  task = make_task()
  params = task.init(jax.random.PRNGKey(0), None)
  split = {k: v[0] for k, v in data.test.items()}
  frozen = {"w0": data.frozen["w0"][0]}
  whole = evaluation.chunked_metrics(task.predict, params, frozen, split, 10_000)
  chunked = evaluation.chunked_metrics(task.predict, params, frozen, split, 7)
  np.testing.assert_allclose(whole, chunked, rtol=1e-5)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(epochs=0), "config.optim.epochs=0"),
    (dict(batch_size=-1), "config.optim.batch_size=-1"),
    (dict(learning_rate=0.0), "config.optim.lr=0.0"),
    (dict(weight_decay=-1.0), "config.optim.weight_decay=-1.0"),
  ],
)
def test_bad_settings(kwargs, match):
  base = dict(epochs=1, batch_size=8, learning_rate=1e-3)
  base.update(kwargs)
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    train.Settings(**base)


def test_batch_larger_than_training_set():
  data = small_problem([0])
  with pytest.raises(ValueError, match="batch_size=500 is larger than the training set"):
    train.fit(make_task(), data, [0], train.Settings(epochs=1, batch_size=500, learning_rate=1e-3), log=None)


# ------------------------------------------------------------------------- loss with aux outputs


def _aux_task(weight):
  """A linear regression whose aux output penalises the squared norm of the weights (weight x ||w||^2)."""
  base = make_task("lora")

  def predict(params, frozen, inputs):
    pred = base.predict(params, frozen, inputs)
    norm = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(params))
    return pred, {"aux_loss": weight * norm, "norm": norm}

  return train.Task(
    init=base.init,
    predict=predict,
    aux_names=("aux_loss", "norm"),
    diagnostics=lambda p, f, inputs: {"mean_abs_pred": jnp.abs(base.predict(p, f, inputs)).mean(0)},
  )


@pytest.mark.slow
def test_aux_loss_is_added_to_the_objective_and_recorded():
  data = small_problem([0, 1])
  plain = train.fit(make_task("lora"), data, [0, 1], SETTINGS, log=None)
  zero = train.fit(_aux_task(0.0), data, [0, 1], SETTINGS, log=None)
  heavy = train.fit(_aux_task(1.0), data, [0, 1], SETTINGS, log=None)
  # Weight 0: the same trajectory as the task without aux outputs; the aux scalars are still recorded.
  np.testing.assert_allclose(zero.history, plain.history, rtol=1e-6, atol=1e-7)
  assert zero.train_names == ("loss", "aux_loss", "norm")
  assert zero.train_history.shape == (2, SETTINGS.epochs, 3)
  np.testing.assert_array_equal(zero.train_history[..., 1], 0.0)
  assert np.all(zero.train_history[..., 2] > 0)
  # A heavy penalty changes training: smaller weights than without it.
  assert np.all(heavy.train_history[:, -1, 2] < 0.75 * zero.train_history[:, -1, 2])
  # Diagnostics: one value per entry and epoch, shaped like the task's output.
  assert heavy.diagnostics["mean_abs_pred"].shape == (2, SETTINGS.epochs, 8)
  assert np.all(np.isfinite(heavy.diagnostics["mean_abs_pred"]))


@pytest.mark.slow
def test_training_loss_is_recorded_without_aux():
  data = small_problem([0])
  fit = train.fit(make_task(), data, [0], SETTINGS, log=None)
  assert fit.train_names == ("loss",)
  loss = fit.train_history[0, :, 0]
  assert np.all(np.isfinite(loss)) and loss[-1] < loss[0]


@pytest.mark.slow
def test_steps_per_epoch_streams_passes_and_resumes_identically():
  data = small_problem([0])  # 200 training rows, batch 32: 7 steps per pass
  stream = dataclasses.replace(SETTINGS, epochs=6, steps_per_epoch=3)
  full = train.fit(make_task(), data, [0], stream, log=None)
  assert full.history.shape[1] == 6
  # Stopping after 4 "epochs" (12 steps, inside the second pass) and resuming replays the same batches.
  seen = []

  class Stop(Exception):
    pass

  def stop_at_four(fit_state):
    if fit_state.epoch == 4:
      seen.append(fit_state)
      raise Stop

  with pytest.raises(Stop):
    train.fit(make_task(), data, [0], stream, log=None, on_epoch_end=stop_at_four)
  resumed = train.fit(make_task(), data, [0], stream, log=None, resume=seen[0])
  np.testing.assert_array_equal(resumed.history, full.history)
  np.testing.assert_array_equal(resumed.train_history, full.train_history)
  # An "epoch" of 7 steps is exactly one pass (the default epoch).
  one_pass = train.fit(make_task(), data, [0], dataclasses.replace(SETTINGS, epochs=1), log=None)
  as_stream = train.fit(make_task(), data, [0], dataclasses.replace(SETTINGS, epochs=1, steps_per_epoch=7), log=None)
  np.testing.assert_allclose(as_stream.history, one_pass.history, rtol=1e-6)


def test_steps_per_epoch_longer_than_a_pass_is_refused():
  data = small_problem([0])
  with pytest.raises(ValueError, match="steps_per_epoch=8 is more than one pass"):
    train.fit(make_task(), data, [0], dataclasses.replace(SETTINGS, steps_per_epoch=8), log=None)


# ------------------------------------------------------------------------- blow-ups, eval_every, optimiser


@pytest.mark.slow
def test_finite_blow_up_is_flagged_as_diverged():
  data = small_problem([0, 1])
  lines = []
  r = train.fit(
    make_task("lora"),
    data,
    [0, 1],
    train.Settings(epochs=4, batch_size=32, learning_rate=1e-3),
    learning_rate=[3e-3, 30.0],
    log=lines.append,
  )
  assert r.status[0] == "ok"
  assert r.diverged_step[1] == -1  # finite all along: not the non-finite guard
  assert r.status[1].startswith("diverged at epoch 1 (training loss grew from"), r.status[1]
  assert any("seed 1: diverged at epoch 1" in line for line in lines)


@pytest.mark.slow
def test_eval_every_runs_several_epochs_per_call_and_matches_every_epoch():
  data = small_problem([0])
  every = train.fit(make_task(), data, [0], dataclasses.replace(SETTINGS, epochs=4), log=None)
  sparse = train.fit(make_task(), data, [0], dataclasses.replace(SETTINGS, epochs=4, eval_every=2), log=None)
  assert np.all(np.isnan(sparse.history[:, [0, 2]])) and np.all(np.isfinite(sparse.history[:, [1, 3]]))
  np.testing.assert_allclose(sparse.history[:, [1, 3]], every.history[:, [1, 3]], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sparse.train_history, every.train_history, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="epochs=3 is not a multiple of config.optim.eval_every=2"):
    dataclasses.replace(SETTINGS, epochs=3, eval_every=2)


@pytest.mark.slow
def test_optimizer_from_config_schedule_and_clipping():
  settings = train.Settings.from_config(
    {"epochs": 2, "batch_size": 32, "lr": 3e-3, "schedule": "cosine", "warmup_steps": 3, "grad_clip": 0.5}
  )
  assert settings.learning_rate == 3e-3 and settings.schedule == "cosine"
  multiplier = optimizer.lr_multiplier(settings, 14)
  assert float(multiplier(0)) == 0.0 and float(multiplier(3)) == pytest.approx(1.0)
  assert float(multiplier(14)) == pytest.approx(0.0, abs=1e-6)
  data = small_problem([0])
  plain = train.fit(make_task(), data, [0], dataclasses.replace(SETTINGS, epochs=2), log=None)
  shaped = train.fit(make_task(), data, [0], settings, log=None)
  assert shaped.status == ["ok"] and not np.allclose(plain.history, shaped.history)
  with pytest.raises(ValueError, match=r"config.optim has unknown key\(s\) \['lr_decay'\]"):
    train.Settings.from_config({"epochs": 1, "batch_size": 8, "lr": 1e-3, "lr_decay": 0.5})
  with pytest.raises(ValueError, match="config.optim.lr=inf must be > 0 and finite"):
    train.Settings(epochs=1, batch_size=8, learning_rate=float("inf"))
  with pytest.raises(ValueError, match="config.optim.eval_every=0 must be a positive integer"):
    train.Settings(epochs=1, batch_size=8, learning_rate=1e-3, eval_every=0)
  with pytest.raises(ValueError, match="config.optim.schedule='cosin' is not known"):
    train.Settings(epochs=1, batch_size=8, learning_rate=1e-3, schedule="cosin")


@pytest.mark.slow
def test_eval_train_rows_evaluates_the_training_prefix_only():
  data = small_problem([0, 1])
  full = train.fit(make_task(), data, [0, 1], SETTINGS, log=None)
  part = train.fit(make_task(), data, [0, 1], dataclasses.replace(SETTINGS, eval_train_rows=50), log=None)
  np.testing.assert_array_equal(part.history[:, :, -1], full.history[:, :, -1])  # test split unchanged
  assert not np.allclose(part.history[:, :, 0], full.history[:, :, 0])  # train metrics differ
  # The prefix's metrics are those of a fit whose training split is evaluated on those 50 rows alone.
  task, params = make_task(), jax.tree_util.tree_map(lambda a: a[0], part.params)
  prefix = {k: v[0, :50] for k, v in data.train.items()}
  want = evaluation.evaluate(task, params, {"w0": data.frozen["w0"][0]}, prefix, SETTINGS.eval_batch_size)
  np.testing.assert_allclose(part.history[0, -1, 0], want, rtol=1e-5)
  with pytest.raises(ValueError, match=r"eval_train_rows=201 is more than the training set \(200 rows\)"):
    train.fit(make_task(), data, [0], dataclasses.replace(SETTINGS, eval_train_rows=201), log=None)
  with pytest.raises(ValueError, match=r"config\.optim\.eval_train_rows=-1"):
    dataclasses.replace(SETTINGS, eval_train_rows=-1)
