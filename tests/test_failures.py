"""Every experiment on the same rails (`localmoe.runner`): a method that fails is isolated, the run raises
RunFailed without results.json (launch.py's exit 1: tests/test_reliability.py), and running it again retrains
only the failed method.

Each experiment's quick variant runs here in this process, as launch.py runs it (validate, then the driver):
a launched process would add its interpreter, imports and data loading, twice per experiment, to what the
test checks. What only a process shows (exit codes, signals, the console) is checked by launching in
tests/test_launch.py and tests/test_reliability.py."""

import importlib
import json
import os
import re

import pytest

import experiments
from localmoe import results as results_lib
from localmoe import runner
from tests.test_launch import CONFIGS, QUICK_HERE, ROOT, check_quick_results, runs_methods

pytestmark = pytest.mark.slow  # every test here trains end to end

# The method to fail and the methods that train through train.fit and resume, where the default (fail the
# first method of the quick variant, the rest must finish and resume) does not fit the experiment.
OVERRIDES = {
  "svd_simulation": ("lora", ["melora", "localized_lora", "blockwise_moe", "cellwise_moe"]),
  "california_housing": ("cellwise_moe", ["melora", "localized_lora", "lora", "blockwise_moe"]),
  "mnist_degradation": ("melora", ["localized_lora", "lora", "blockwise_moe", "cellwise_moe"]),
  "mnist_adaptation": ("localized_lora", ["full_finetune"]),
  "nonconvex_regression": ("queryable_lora", ["lora"]),
}


# Experiments whose forced failure and re-run the named test checks instead: it runs the quick variant
# twice (a forced failure, then its resume) with checks of its own, and a case here would repeat it.
IN_PROCESS = {
  "multitask_lm": "tests/test_multitask_lm.py::test_quick_config_end_to_end_with_a_failed_method_retrained_alone",
  "multitask_text": "tests/test_multitask_report.py::test_a_failed_method_retrains_alone_and_a_diverged_one_is_reported",
}


def _cases():
  """Every experiment whose driver trains methods through the runner, found the way launch.py finds them."""
  cases = []
  for name in experiments.names():
    if name in IN_PROCESS:
      continue
    if not runs_methods(f"{name}.py"):  # trains nothing through the runner (e.g. a closed-form table)
      continue
    if name in OVERRIDES:
      cases.append((name, *OVERRIDES[name]))
    else:
      methods = [m for m in importlib.import_module(f"configs.{name}").get_config("quick").method_names.split(",") if m]
      cases.append((name, methods[0], methods[1:]))
  return cases


CASES = _cases()
# every config runs quick once, here, in test_launch, or in its IN_PROCESS test
assert sorted(f"{c}.py" for c in [*(c[0] for c in CASES), *IN_PROCESS]) == sorted(set(CONFIGS) - set(QUICK_HERE))


def test_in_process_cases_name_tests_that_exist():
  for name, node in IN_PROCESS.items():
    path, test = node.split("::")
    assert f"def {test}(" in open(os.path.join(ROOT, path), encoding="utf-8").read(), (name, node)


def _run_quick(config: str, workdir, capsys):
  """The experiment's quick variant, run as launch.py runs it: (its console output, the RunFailed it raised or
  None)."""
  cfg = importlib.import_module(f"configs.{config}").get_config("quick")
  experiments.validate(cfg)
  error = None
  try:
    experiments.get(config)(cfg, str(workdir))
  except results_lib.RunFailed as failed:  # launch.py: exit 1
    error = failed
  captured = capsys.readouterr()
  return captured.out + captured.err, error


@pytest.mark.slow
@pytest.mark.parametrize("config, failing, others", CASES, ids=[c[0] for c in CASES])
def test_a_failed_method_is_isolated_and_only_it_is_retrained(config, failing, others, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(runner.FAIL_ENV, failing)
  out, error = _run_quick(config, tmp_path, capsys)
  assert isinstance(error, results_lib.RunFailed), out[-3000:]
  assert not (tmp_path / "results.json").exists()
  assert re.search(rf"\[([\w.-]+/)?{failing}\] FAILED: ForcedFailure", out), out[-3000:]
  for name in others:  # the others trained to the end
    assert re.search(rf"\[([\w.-]+/)?{name}\]", out), (name, out[-3000:])
  monkeypatch.delenv(runner.FAIL_ENV)
  out, error = _run_quick(config, tmp_path, capsys)
  assert error is None, out[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert all(m["status"] == "ok" for m in results["methods"].values())
  for name in others:  # finished methods load their final checkpoint
    assert re.search(rf"\[([\w.-]+/)?{name}\] resuming from the checkpoint at epoch (\d+)/\2", out), (name, out[-3000:])
  assert not re.search(rf"\[([\w.-]+/)?{failing}\] resuming", out), out[-3000:]  # the failed one retrains
  check_quick_results(tmp_path, f"{config}.py")  # the quick run's schema (test_launch skips these configs)
