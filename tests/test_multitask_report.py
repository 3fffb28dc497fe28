"""The multi-task report when a routed method diverges: every seed of it non-finite from some evaluation on.

The table marks the method with a dagger and prints "n/a" where no seed has a value; the live scalars
(TensorBoard, progress line) skip values no seed has, so neither numpy nor tensorboardX warns; the figures
stop where every seed stopped; results.json holds no NaN."""

import json
import logging
import re
import warnings

import ml_collections
import numpy as np
import pytest

from configs import multitask_text as config_module
from experiments import multitask_text as mt
from experiments import multitask_text_report as report
from localmoe import results, runner, train
from tests.test_launch import check_quick_results

TASKS, CLASSES = ("a", "b"), (2, 3)
SEEDS = [0, 1]


def corpus():
  counts = {t: {"train": 4, "val": 2, "test": 4} for t in TASKS}
  return mt.Corpus(TASKS, CLASSES, train={}, val={}, test={}, counts=counts)


def diverged_fit(evals=2):
  """A routed method's FitResult whose every seed diverged in the last evaluation (NaN from there on)."""
  width = len(mt.metric_names(TASKS, CLASSES))
  history = np.full((len(SEEDS), evals, 3, width), 0.5, np.float32)
  history[:, -1] = np.nan
  train_history = np.ones((len(SEEDS), evals, 3), np.float32)
  train_history[:, -1] = np.nan
  diagnostics = {
    "entropy_nats": np.full((len(SEEDS), evals), 1.2, np.float32),
    "task_separation": np.full((len(SEEDS), evals), 0.1, np.float32),
    "usage": np.full((len(SEEDS), evals, 1, len(TASKS), 2, 4), 0.25, np.float32),
  }
  for value in diagnostics.values():
    value[:, -1] = np.nan
  return train.FitResult(
    params={},
    history=history,
    status=[f"diverged at epoch {evals}"] * len(SEEDS),
    diverged_step=np.ones(len(SEEDS), np.int32),
    wall_time_s=1.0,
    splits=("train", "val", "test"),
    metric_names=mt.metric_names(TASKS, CLASSES),
    train_history=train_history,
    train_names=("loss", "load_balance", "router_z"),
    diagnostics=diagnostics,
    initial_diagnostics={
      "entropy_nats": np.full(len(SEEDS), 1.386, np.float32),
      "task_separation": np.zeros(len(SEEDS), np.float32),
    },
  )


def test_a_routed_method_whose_every_seed_diverged_is_marked_in_the_table_not_a_crash():
  config = config_module.get_config("quick")
  summary = mt.summarise("cellwise_moe_anchor", diverged_fit(), SEEDS, corpus(), 100, 10)
  assert summary["routing_entropy_nats"] is None and summary["accuracy/mean"]["mean"] is None
  assert summary["routing_entropy_per_seed"]["final"] == [None, None]
  json.dumps(summary, allow_nan=False)  # results.json holds no NaN
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    text = report.markdown(
      config, corpus(), {"cellwise_moe_anchor": summary}, mt.paired_differences({"cellwise_moe_anchor": summary}), 1.0
    )
  label = mt.LABELS["cellwise_moe_anchor"]
  assert f"| {label} † | 100 | n/a | n/a |" in text
  assert f"| {label} † | 1.386 | n/a | 0.000 | n/a |" in text  # router table: init, end
  assert f"† {label}: seed 0: diverged at epoch 2; seed 1: diverged at epoch 2" in text


def test_live_scalars_skip_values_no_seed_has(capsys):
  fit = diverged_fit()
  live = mt.LiveHistory(None, corpus())
  recorded = []
  live.files.record = lambda method, rows, scalars, step: recorded.append((rows, scalars))
  hook = live.hook("cellwise_moe_anchor", SEEDS, ml_collections.ConfigDict(dict(epochs=2)), fit.train_names)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # numpy's "Mean of empty slice" would raise
    for epoch in (1, 2):
      hook(
        train.FitState(
          state=None, epoch=epoch, history=fit.history, train_history=fit.train_history, diagnostics=fit.diagnostics
        )
      )
  first, last = recorded[0][1], recorded[1][1]
  assert first["train_stream/loss"] == 1.0 and first["routing/entropy_nats"] == pytest.approx(1.2)
  assert all(np.isfinite(v) for v in last.values())  # tensorboardX is never handed NaN
  assert "train_stream/loss" not in last and "routing/entropy_nats" not in last
  assert all(np.isfinite(row[-1]) for row in recorded[1][0])  # history.csv rows: finite values only
  out = capsys.readouterr().out
  assert "eval  2/2  loss nan" in out and "router H nan sep nan" in out


def test_figures_stop_where_every_seed_stopped(tmp_path):
  fit = diverged_fit(evals=3)
  fit.history[:, 1] = np.nan
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    report.figures(
      str(tmp_path),
      {"cellwise_moe_anchor": fit},
      corpus(),
      train.Settings(epochs=3, batch_size=1, learning_rate=1e-3, steps_per_epoch=1),
      {},
    )
  assert (tmp_path / "accuracy.png").exists() and (tmp_path / "loss.png").exists()
  cut = report.finite_prefix({"m": fit.history[:, :, 1, 0], "none": np.full((2, 3), np.nan)})
  assert list(cut) == ["m"] and cut["m"].shape == (2, 1)


@pytest.mark.slow
@pytest.mark.network  # the text tasks and MiniLM (cached after one fetch)
def test_a_failed_method_retrains_alone_and_a_diverged_one_is_reported(tmp_path, monkeypatch, caplog, capfd):
  """:quick at the bug report's learning rate (1e6: the trained methods diverge), run twice in this process,
  first with lora forced to fail. The first run raises RunFailed and writes no results.json; the routed
  method trains to its end and its seed is marked diverged. The re-run retrains lora alone (the routed method
  resumes from its final checkpoint) and ends normally: results.json and results.md mark the seeds, and the
  console holds the project's own lines only (no numpy or JAX warning: a RuntimeWarning raises here, and JAX's
  "NaN or Inf" log line is looked for). This is the experiment's case of tests/test_failures.py."""
  config = config_module.get_config("quick,seeds=1")
  assert config.method_names == "linear_probe,lora,cellwise_moe_anchor"
  config.optim.lr = 1e6
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    with caplog.at_level(logging.WARNING):
      monkeypatch.setenv(runner.FAIL_ENV, "lora")
      with pytest.raises(results.RunFailed):
        mt.run(config, str(tmp_path))
      first = "".join(capfd.readouterr())
      assert not (tmp_path / "results.json").exists()
      monkeypatch.delenv(runner.FAIL_ENV)
      out = mt.run(config, str(tmp_path))
      second = "".join(capfd.readouterr())
  assert "[lora] FAILED: ForcedFailure" in first, first[-3000:]
  diverged = r"\[cellwise_moe_anchor\] test accuracy .*NOT ALL SEEDS OK: seed \d: diverged at epoch"
  assert re.search(diverged, first), first[-3000:]  # the other methods ran to their end
  assert "[linear_probe] test accuracy" in first, first[-3000:]
  assert re.search(r"\[cellwise_moe_anchor\] resuming from the checkpoint at epoch (\d+)/\1", second), second[-3000:]
  assert "[lora] resuming" not in second and "[lora] test accuracy" in second, second[-3000:]  # retrained
  assert not [r for r in caplog.records if "NaN or Inf" in r.getMessage()]
  assert first.count("Traceback") == 1, first[-3000:]  # the forced failure's, and no other
  for noise in ("Traceback", "Mean of empty slice", "NaN or Inf", "RuntimeWarning"):
    assert noise not in second and (noise == "Traceback" or noise not in first), (first + second)[-3000:]
  saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
  assert saved["methods"]["linear_probe"]["status"] == "ok"
  for name in ("cellwise_moe_anchor", "lora"):
    assert "diverged" in out["methods"][name]["status"] and "diverged" in saved["methods"][name]["status"], name
  assert "(task id, anchors' router) † |" in (tmp_path / "results.md").read_text()
  check_quick_results(tmp_path, "multitask_text.py", status=lambda s: s == "ok" or "diverged" in s)
