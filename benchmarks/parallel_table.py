"""TP degree, KV placement, max batch and predicted tokens/s for Llama-3-8B / 70B on H100 nodes and an L4.

For every (model, target, context) the same solver (``kvcompile.solve.parallel``, objective
``max-throughput`` over the whole node: ``gpus // TP`` data-parallel replicas) is run on three caches:

* ``kvcompile``: the per-head plan the planner compiles at a KV budget of 25 % of full bf16 bytes
  (``optimize(..., kv_budget=0.25)``; meta configs have no weights, so its damage model is the
  planner's literature priors, see ``plan.predicted["damage_source"]``), placed by the ``place_kv``
  pass of the same compile;
* ``fp16``: every KV head ``full`` in the model dtype (bf16: 2 bytes, what vLLM's default
  ``kv_cache_dtype=auto`` stores);
* ``fp8``: every KV head ``fp8`` (vLLM's ``--kv-cache-dtype fp8``).

Everything is predicted from datasheet numbers (``targets/*.yaml``) and exact byte counts; nothing
runs on a GPU. Writes ``benchmarks/results/parallel_table.json`` and prints a markdown table.

Run: ``OMP_NUM_THREADS=1 python benchmarks/parallel_table.py`` (about 3-5 minutes on one core).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from kvcompile import capture
from kvcompile.api import optimize
from kvcompile.models import load
from kvcompile.passes import PassError
from kvcompile.passes.place import problem_for
from kvcompile.solve.parallel import ParallelInfeasible, solve_parallel
from kvcompile.targets import load_target

MODELS = ("llama-3-8b", "llama-3-70b")
TARGETS = ("h100-sxm:1", "h100-sxm:2", "h100-sxm:4", "h100-sxm:8", "l4")
CONTEXTS = (8192, 32768, 131072)
BASELINES = {"fp16": {"name": "full", "dtype": "model"}, "fp8": {"name": "fp8"}}
BUDGET = 0.25
OUT = Path(__file__).resolve().parent / "results" / "parallel_table.json"


def summarize(pl: dict | None, error: str | None = None) -> dict:
    """The table cell of one placement (or why nothing fits)."""
    if pl is None or "tp" not in pl:
        return {"fits": False, "reason": error or (pl or {}).get("error", "no placement")}
    host = pl["host_layers"]
    return {
        "fits": True,
        "tp": pl["tp"],
        "replicas": pl.get("replicas", 1),
        "batch": pl["batch"],
        "tokens_per_s": round(pl.get("node_tokens_per_s", pl["tokens_per_s"]), 1),  # per node
        "step_ms": round(pl["step_time_s"] * 1e3, 3),
        "placement": f"host: {len(host)} layers" if host else "all HBM",
        "host_kv_bytes": pl["host_kv_bytes"],
        "per_gpu_gib": {k: round(v / 2**30, 2) for k, v in pl["per_gpu"].items()},
        "binding": pl["binding"],
    }


def run(models=MODELS, targets=TARGETS, contexts=CONTEXTS) -> dict:
    rows = []
    for name in models:
        program = capture(load(name).model)
        for spec in targets:
            target = load_target(spec)
            for context in contexts:
                t0 = time.perf_counter()
                try:
                    plan = optimize(name, target=spec, context=context, kv_budget=BUDGET,
                                    objective="max-throughput", progress=False)  # fmt: skip
                except PassError as e:  # place_kv: nothing fits (e.g. 70B weights on one GPU)
                    cells = {"kvcompile": summarize(None, str(e.__cause__ or e))}
                else:
                    cells = {"kvcompile": summarize(plan.placement)}
                    kinds = sorted({json.dumps(h, sort_keys=True) for lp in plan.layers for h in lp.heads})
                    cells["kvcompile"]["kv_ratio_vs_fp16"] = round(
                        plan.predicted_kv_bytes(context) / plan.full_kv_bytes(context, dtype="bfloat16"), 4)
                    cells["kvcompile"]["strategies"] = kinds
                for label, spec_ in BASELINES.items():
                    rows_ = [[spec_] * s.num_kv_heads for s in program.sites]
                    try:
                        sol = solve_parallel(problem_for(program, target, context=context, assignment=rows_,
                                                         objective="max-throughput"))  # fmt: skip
                        cells[label] = summarize(sol.to_facts())
                    except ParallelInfeasible as e:
                        cells[label] = summarize(None, str(e))
                rows.append({"model": name, "target": spec, "context": context, **cells,
                             "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
                print(f"{name} {spec} {context}: " + ", ".join(
                    f"{k} {v.get('tokens_per_s', '-')}" for k, v in cells.items()), flush=True)  # fmt: skip
    return {
        "description": __doc__.split("\n\n")[0],
        "objective": "max-throughput",
        "kvcompile_plan": f"planner at kv_budget={BUDGET} of full bf16 bytes (priors on meta configs)",
        "baselines": BASELINES,
        "assumptions": "kvcompile.solve.parallel module docstring; host memory 256 GiB per GPU, reserve 5 %, "
        "prefill chunk 2048 tokens, max batch 1024",
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "device": "none"},
        "rows": rows,
    }


def markdown(result: dict) -> str:
    """One line per (model, target, context): TP / placement / batch / tokens/s for each cache."""
    cols = (f"{c}: TP(xDP), placement, batch/replica, node tok/s" for c in ("kvcompile", "fp16", "fp8"))
    head = "| model | target | context | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * 6]
    for r in result["rows"]:
        cells = []
        for c in ("kvcompile", "fp16", "fp8"):
            x = r[c]
            dp = f"x{x['replicas']}" if x.get("replicas", 1) > 1 else ""
            cells.append(f"TP{x['tp']}{dp}, {x['placement']}, {x['batch']}, {x['tokens_per_s']:.0f}"
                         if x["fits"] else "does not fit")  # fmt: skip
        where = f"| {r['model']} | {r['target']} | {r['context'] // 1024}k | "
        lines.append(where + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--targets", nargs="*", default=list(TARGETS))
    ap.add_argument("--contexts", nargs="*", type=int, default=list(CONTEXTS))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    result = run(args.models, args.targets, args.contexts)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
