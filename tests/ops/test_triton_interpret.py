"""The Triton kernels' logic on CPU, under Triton's interpreter (skips without Triton 3.6)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


@pytest.mark.skipif(not triton.__version__.startswith("3.6"), reason="interpreter checks written for Triton 3.6")
def test_kernels_under_interpreter():
    script = Path(__file__).with_name("_interp_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(script), "quick"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
