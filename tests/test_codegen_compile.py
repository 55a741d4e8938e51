"""Every kernel compiles for an NVIDIA sm_90 target (PTX + cubin via Triton's bundled ptxas) without a
GPU, in a subprocess with ``TRITON_INTERPRET`` unset (``kvcompile.codegen.aot``): catches what the CPU
interpreter tolerates but the compiler rejects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "kvcompile.codegen.aot", "90"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {name: True for name in result}, result
    assert len(result) == 6 and proc.returncode == 0
