"""The benchmark scripts stay runnable: each one imports the project and parses its options
(``--help``). Their figures come from running them in full, never from tests."""

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # each script imports torch, diffusers and open_clip before parsing --help: ~35 s for the four
@pytest.mark.parametrize("script", ["attention.py", "clip_step.py", "diffusion.py", "caption.py"])
def test_benchmark_starts(script):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
