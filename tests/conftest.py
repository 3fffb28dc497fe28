"""Test tiers. `python -m pytest -q -m "not slow"` is the quick tier a contributor runs while editing; the
full suite (the README's test command, what CI runs) includes the `slow` tests.

A test is slow where it is defined: `@pytest.mark.slow` on the test, or `pytestmark = pytest.mark.slow` in a
module whose every test launches processes or trains end to end. A test that compiles or trains for 1.5 s or
more on 2 CPU cores (`python -m pytest -m "not slow" --durations=0`) is marked slow. A `network` test (it may
fetch a wheel) is slow as well, by the rule below.
"""

import pytest


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.get_closest_marker("network") is not None:
      item.add_marker(pytest.mark.slow)
