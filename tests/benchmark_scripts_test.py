"""Every benchmark script starts as its README command runs it (`python -m benchmarks.<name>`).

Run as `__main__`, a script is a second copy of its module: an import cycle between two
scripts that works in-process can fail there (`kernel_profile` <-> `layer` once did, on
the GPU). `--help` imports everything and runs nothing.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
    name[:-3] for name in os.listdir(os.path.join(ROOT, "benchmarks"))
    if name.endswith(".py") and name not in ("__init__.py", "timing.py", "synthetic.py")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_and_parses_its_arguments(script):
  result = subprocess.run(
      [sys.executable, "-m", f"benchmarks.{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
      timeout=240, env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "usage:" in result.stdout
