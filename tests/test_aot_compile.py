"""Every Triton kernel variant compiles for Hopper (sm_90), on a machine without a GPU.

The CPU suite runs the kernels under Triton's interpreter, which accepts code that the GPU
compiler rejects; ``scripts/aot_compile_check.py`` runs the real compiler and ``ptxas`` for sm_90
(no device needed). Its own process: with ``TRITON_INTERPRET=1`` set (as here on a CPU) Triton
would hand out interpreted functions instead of compilable ones.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/aot_compile_check.py"),
                           "--nkb-pad", "1024", "4096"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=580)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "FAIL" not in report and report.count("ok ") >= 14, report
