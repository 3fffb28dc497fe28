"""Test tiers. `python -m pytest -q -m "not slow"` is the quick tier a contributor runs while editing; the
full suite (the README's test command, what CI runs) includes the `slow` tests.

`slow` marks tests that launch processes or train for more than a few seconds: every test of the modules in
SLOW_MODULES (end-to-end launches, experiment runs, sharding in subprocesses, benchmarks, sweeps), every
`network` test (it may fetch a wheel), the process-launching tests in SLOW_TESTS and tests marked `@pytest.mark.slow` where they are defined.
"""

import pytest

SLOW_MODULES = {
    "test_launch", "test_readme", "test_failures", "test_sharding", "test_real_experiments", "test_benchmarks",
    "test_sweep", "test_nonconvex",
}
SLOW_TESTS = {                                   # tests of otherwise quick modules that launch processes
    "test_config_file_and_arg_errors_are_one_line", "test_cli_error_writes_nothing",
    "test_second_process_is_refused_and_stale_lock_cleared", "test_sigterm_mid_run_then_resume_is_bit_identical",
    "test_cli_resume_under_another_config_exits_2_with_the_fields",
    "test_failed_method_exits_nonzero_is_not_finished_and_keeps_the_others",
    "test_sigterm_stops_a_sweep_with_75_and_the_resume_is_bit_identical",
    "test_sigterm_stops_the_nonconvex_run_with_75_and_the_resume_is_bit_identical",
    "test_every_route_failing_says_where_to_put_the_files", "test_second_load_reads_the_cache",
    "test_unknown_task_and_every_route_failing",
}


def pytest_collection_modifyitems(config, items):
  for item in items:
    module = item.module.__name__.rsplit(".", 1)[-1]
    name = item.originalname if hasattr(item, "originalname") else item.name
    if module in SLOW_MODULES or name in SLOW_TESTS or item.get_closest_marker("network") is not None:
      item.add_marker(pytest.mark.slow)
