"""Cold and warm calibrated compile of SmolLM2 at 4k tokens, through the CLI as a user runs it.

Cold: a fresh ``KVCOMPILE_CACHE_DIR`` (no calibration, verification or kernel caches; only the model's
converted weights are linked in, a one-time conversion that is not part of compiling), so calibration
and verification run in full. Warm: the same command again. Each run is a new process; the wall time
includes Python start-up, model load and capture. Writes ``results/compile_time_cpu.json``::

    OMP_NUM_THREADS=1 python benchmarks/compile_time.py [--context 4096] [--budget 0.25] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "compile_time_cpu.json"


def run(cmd: list[str], env: dict[str, str]) -> dict[str, object]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"compile failed ({p.returncode}): {p.stderr[-2000:]}")
    text = p.stderr.replace("\r", "\n") + p.stdout
    passes = {}
    line = next((ln for ln in text.splitlines() if "passes:" in ln), "")
    for name, sec in re.findall(r"(\w+) ([0-9.]+)s", line.split("passes:", 1)[-1]):
        passes[name] = float(sec)
    return {"wall_s": round(wall, 1), "passes_s": passes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    from kvcompile.eval.tasks import machine_info
    from kvcompile.models import cache_dir

    rows = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            fresh = Path(d)
            models = cache_dir() / "models"
            if models.is_dir():
                (fresh / "models").symlink_to(models)
            env = {**os.environ, "KVCOMPILE_CACHE_DIR": str(fresh), "HF_HUB_OFFLINE": "1"}
            out = fresh / "plan.kvplan"
            cmd = [sys.executable, "-m", "kvcompile.cli", "compile", "smollm2-135m", "--context", str(args.context),
                   "--kv-budget", str(args.budget), "-o", str(out)]
            cold = run(cmd, env)
            warm = run(cmd, env)
            rows.append({"cold": cold, "warm": warm})
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "description": __doc__.split("\n\n")[0],
        "command": f"kvcompile compile smollm2-135m --context {args.context} --kv-budget {args.budget}",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": machine_info(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": rows,
        "bar": {"cold_s_max": 60, "warm_s_max": 10},
        "cold_s": [r["cold"]["wall_s"] for r in rows],
        "warm_s": [r["warm"]["wall_s"] for r in rows],
    }
    OUT.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("cold_s", "warm_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
