"""Smoke tests of the benchmarks: they run, check themselves and report every ratio they promise."""

import pytest

from benchmarks import layer_bench

pytestmark = pytest.mark.slow  # every test here launches processes or trains end to end


def test_layer_bench_quick_runs_and_the_baselines_match_the_library(tmp_path):
  result = layer_bench.main(["--quick", "--repeats", "1", "--no-heap-pass", "--json", str(tmp_path / "b.json")])
  rows = {r["method"]: r for r in result["main"] + result["dense"]}
  for name, row in rows.items():
    if row["rel_error_vs_library"] is not None:  # naive loop and dense per-example update
      assert row["rel_error_vs_library"] < 1e-4, name
  assert set(result["ratios"]["median"]) >= set(layer_bench.TARGETS)
  assert set(result["temp_ratios"]) == {"localized_lora / lora", "blockwise_moe / lora", "cellwise_moe / lora"}
  assert (tmp_path / "b.json").stat().st_size > 0


def test_layer_bench_refuses_sizes_without_an_equal_budget_rank():
  with pytest.raises(ValueError, match="--r-lora 10"):
    layer_bench.main(["--quick", "--r-lora", "10"])
