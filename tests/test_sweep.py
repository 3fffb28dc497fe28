"""Sweeps: expanding get_sweep, grouping by shape, vmapped groups equal entries run alone, summaries."""

import json
import os
import sys

import numpy as np
import pytest

from localmoe import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import svd_simulation as svd_config  # noqa: E402
from experiments import svd_simulation  # noqa: E402

pytestmark = pytest.mark.slow  # every test here launches processes or trains end to end


def quick_config():
  config = svd_config.get_config("quick")
  config.data.num_samples = 400
  config.optim.epochs = 2
  return config


def test_overrides_apply_and_typos_fail():
  config = quick_config()
  out = sweep.apply_overrides(config, {"optim.lr": 3e-3, "methods.lora.rank": 8, "_name": "x"})
  assert out.optim.lr == 3e-3 and out.methods.lora.rank == 8
  assert config.optim.lr == 1e-3  # the base config is untouched
  with pytest.raises(ValueError, match="'optim.learnin_rate'"):
    sweep.apply_overrides(config, {"optim.learnin_rate": 1.0})
  with pytest.raises(ValueError, match="'nope.lr'"):
    sweep.apply_overrides(config, {"nope.lr": 1.0})


def test_expand_names_and_workdirs(tmp_path):
  entries = sweep.expand(quick_config(), [{"seed": 1}, {"seed": 2, "_name": "second"}], str(tmp_path))
  assert [e.name for e in entries] == ["seed=1", "second"]
  assert entries[1].workdir == os.path.join(str(tmp_path), "entries", "0001_second")
  assert entries[1].config.seed == 2
  with pytest.raises(ValueError, match="no entries"):
    sweep.expand(quick_config(), [], str(tmp_path))


def test_svd_get_sweep_groups_by_shape():
  overrides = svd_config.get_sweep("quick")
  entries = sweep.expand(quick_config(), overrides, "/unused")
  keys = [sweep.group_key(e.config) for e in entries]
  assert len(overrides) == 8 and len(set(keys)) == 2  # lora and cellwise_moe: two programs
  full = svd_config.get_sweep(None)
  assert len(full) == 5 * 3 * 5


def run_sweep(overrides, workdir, lines=None, **kwargs):
  log = lines.append if lines is not None else (lambda s: None)
  return sweep.run(quick_config(), overrides, str(workdir), svd_simulation, placement=None, log=log, **kwargs)


def test_vmapped_group_equals_entries_alone(tmp_path):
  overrides = [
    {"method_names": "lora", "num_seeds": 1, "seed": s, "optim.lr": lr} for s in (0, 1) for lr in (1e-3, 3e-3)
  ]
  together = run_sweep(overrides, tmp_path / "together")
  assert len({r["group"] for r in together["entries"]}) == 1
  for k, o in enumerate(overrides):
    alone = run_sweep([o], tmp_path / f"alone{k}")["entries"][0]
    row = together["entries"][k]
    np.testing.assert_allclose(row["test_r2"], alone["test_r2"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(row["train_mse"], alone["train_mse"], rtol=1e-4, atol=1e-6)


def test_summary_files_resume_and_sorting(tmp_path, capsys):
  overrides = svd_config.get_sweep("quick")
  lines = []
  summary = run_sweep(overrides, tmp_path, lines)
  assert [r["index"] for r in summary["entries"]] == list(range(8)) and not summary["failed"]
  assert any("8/8 entries done" in line and "left" in line for line in lines)
  on_disk = json.loads((tmp_path / "sweep.json").read_text())
  assert len(on_disk["entries"]) == 8 and "test_r2" in on_disk["metrics"]
  assert (tmp_path / "sweep.md").read_text().count("\n| ") >= 8
  for row in on_disk["entries"]:  # each entry owns a finished sub-workdir
    entry_dir = tmp_path / "entries" / f"{row['index']:04d}_{sweep._slug(row['name'])}"
    assert json.loads((entry_dir / "results.json").read_text())["methods"]
  # A second run in the same workdir trains nothing and reproduces the summary.
  lines = []
  again = run_sweep(overrides, tmp_path, lines)
  assert any("0 trained, 4 already finished" in line for line in lines)
  assert [r["test_r2"] for r in again["entries"]] == [r["test_r2"] for r in summary["entries"]]
  # A re-run under another base config refuses before any compute, naming the entry and the field.
  from localmoe import workdir

  changed = quick_config()
  changed.optim.epochs = 5
  with pytest.raises(workdir.ConfigMismatchError, match=r"finished sweep entry 0 .*optim\.epochs: 2 -> 5.*--overwrite"):
    sweep.run(changed, overrides, str(tmp_path), svd_simulation, placement=None, log=lines.append)
  # A truncated sweep_entry.json is one error naming the file.
  entry_file = next((tmp_path / "entries").glob("0000_*")) / sweep.ENTRY_FILE
  entry_file.write_text(entry_file.read_text()[:20])
  with pytest.raises(workdir.WorkdirError, match=f"{entry_file}.*truncated or unreadable"):
    run_sweep(overrides, tmp_path)
  # Sorting by any metric, and the command-line view.
  ordered = sweep.sort_rows(summary["entries"], "test_mse", descending=False)
  assert [r["test_mse"] for r in ordered] == sorted(r["test_mse"] for r in summary["entries"])
  sweep.main([str(tmp_path), "--sort", "test_mse", "--ascending", "--top", "3"])
  assert "Sorted by test_mse (ascending)" in capsys.readouterr().out


def test_best_per_group():
  rows = [
    {"index": i, "status": "ok", "method": m, "params": p, "val_loss": v}
    for i, (m, p, v) in enumerate([("a", 1, 0.5), ("a", 1, 0.3), ("a", 2, 0.9), ("b", 1, 0.1)])
  ]
  rows.append({"index": 9, "status": "failed", "method": "a", "params": 1, "val_loss": 0.0})
  best = sweep.best_per_group(rows, "val_loss", ["method", "params"], mode="min")
  assert [r["index"] for r in best] == [1, 2, 3]


def test_sweep_without_get_sweep_is_an_error(tmp_path):
  path = tmp_path / "c.py"
  path.write_text("def get_config(arg=None):\n  return None\n")
  with pytest.raises(ValueError, match="has no get_sweep"):
    sweep.load_get_sweep(f"{path}:quick")


@pytest.mark.network  # MNIST from its wheel (cached after one fetch); a failed load fails
def test_mnist_quick_sweep_best_per_budget_and_figure(tmp_path):
  from configs import mnist_adaptation as mnist_config
  from experiments import mnist_adaptation

  config = mnist_config.get_config("quick")
  config.data.max_train = 600
  config.data.max_test = 300
  overrides = mnist_config.get_sweep("quick")
  summary = sweep.run(config, overrides, str(tmp_path), mnist_adaptation, placement=None, log=lambda s: None)
  assert len(summary["entries"]) == 8 and not summary["failed"]
  assert summary["figure2"]["full_finetune"]["params"] == 50_565
  methods = {p["method"] for p in summary["figure2"]["points"]}
  assert methods == {"lora", "localized_lora"}
  assert (tmp_path / "figures" / "figure2_accuracy_drop.png").stat().st_size > 1000
  assert "Best entry per method x params" in (tmp_path / "sweep.md").read_text()
  assert len(mnist_config.get_sweep(None)) == 42 * 3
