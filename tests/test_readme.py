import pytest
"""The README's "Adapting a model" example runs as written and ends with the merged model equal to the adapted one."""

import os
import re
import subprocess
import sys

pytestmark = pytest.mark.slow  # every test here launches processes or trains end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_adapting_a_model_example_runs(tmp_path):
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  section = readme.split("## Adapting a model", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  script = tmp_path / "example.py"
  script.write_text(code)
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "merged model for task 1 equals the adapted model: True" in proc.stdout
  assert (tmp_path / "runs" / "example_adapter" / "adapter_config.json").exists()


def test_nnx_example_runs(tmp_path):
  """The first python block under "### NNX models" runs as written and ends with merged == adapted."""
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  section = readme.split("### NNX models", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  script = tmp_path / "nnx_example.py"
  script.write_text(code)
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "merged NNX model for task 1 equals the adapted model: True" in proc.stdout
  assert (tmp_path / "runs" / "nnx_adapter" / "adapter_config.json").exists()
