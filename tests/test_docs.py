"""The README and every page under docs/ hold only what runs: each page's python blocks run as written, in
order, as one script with its own globals (as a reader would paste them), and every relative link points to a file."""

import glob
import os
import re
import runpy
import sys
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(
  ["README.md", "experiments/README.md"]
  + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)]
)
# Blocks that show a driver's shape (names it leaves to the reader) rather than a program: run nowhere.
TEMPLATES = {"experiments/README.md"}


def _python_blocks(page: str) -> list[str]:
  text = open(os.path.join(ROOT, page), encoding="utf-8").read()
  return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def _links(page: str) -> list[str]:
  text = open(os.path.join(ROOT, page), encoding="utf-8").read()
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # not inside code
  return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_points_to_a_file(page):
  base = os.path.dirname(os.path.join(ROOT, page))
  missing = [t for t in _links(page) if not os.path.exists(os.path.normpath(os.path.join(base, t.split("#")[0])))]
  assert not missing, f"{page} links to missing files: {missing}"


def test_the_readme_stays_a_front_door():
  lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().count("\n")
  assert lines <= 200, f"README.md has {lines} lines; results, readings and details belong in docs/"


def _pages_to_run() -> list[str]:
  """The pages with python blocks, less those whose every block an earlier page also holds (the same example
  on two pages, e.g. README and its page under docs/, runs once, with the earlier page)."""
  run, seen = [], set()
  for page in PAGES:
    blocks = _python_blocks(page)
    if blocks and page not in TEMPLATES and not set(blocks) <= seen:
      run.append(page)
    seen.update(blocks)
  return run


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_to_run())
def test_python_blocks_run_as_written(page, tmp_path, monkeypatch, capsys):
  """The page's blocks as one script, run as `python page.py` runs it (its own globals, in a scratch
  directory), in this process: a name the page forgets to import or define fails here as it would for a
  reader; the interpreter and the libraries' imports are not paid again per page."""
  script = tmp_path / "page.py"
  script.write_text("\n\n".join(_python_blocks(page)))
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "argv", [str(script)])
  try:
    runpy.run_path(str(script), run_name="__main__")
  except Exception as error:
    pytest.fail(f"{page}: {type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}")
  out = capsys.readouterr().out
  for claim in re.findall(r"equals the adapted model: (\w+)|merged == adapted: (\w+)", out):
    assert "True" in claim, out[-2000:]
