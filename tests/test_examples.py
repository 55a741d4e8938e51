"""The scripts in examples/ run end to end as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcompile.plan import load

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, out: Path, timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), str(out)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_plan_70b_8gpu(tmp_path):
    out = _run("plan_70b_8gpu.py", tmp_path / "70b.kvplan")
    assert "full bf16 KV bytes/token: 327680 (expected 327680)" in out
    plan = load(tmp_path / "70b.kvplan")
    assert plan.target.gpus == 8 and plan.config.context == 8192 and plan.config.batch == 16


@pytest.mark.slow
def test_quickstart(tmp_path):
    out = _run("quickstart.py", tmp_path / "q.kvplan")
    plan = load(tmp_path / "q.kvplan")
    assert plan.model.name == "smollm2-135m"
    assert f"saved and re-loaded {tmp_path / 'q.kvplan'}" in out
    if "generated with the plan's cache" in out:
        assert "68301" in out  # SmolLM2 recalls the pass key through the plan's cache
