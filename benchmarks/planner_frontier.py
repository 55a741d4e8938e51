"""Planner frontier on SmolLM2: the solved per-head plan vs every uniform strategy at the same real bytes.

Question-agnostic setting (the haystack is compressed before the question is seen), tasks from the eval
harness (``kvcompile.eval``: passkey at the context length, perplexity of the last ``--ppl-target``
tokens of a ``context``-token prose window). For each context and KV budget (a fraction of the full
bfloat16 cache at that context):

* ``planner``: ``kvcompile.optimize(model, context=C, kv_budget=b)`` (calibrated; verification off,
  the benchmark is the verification);
* every uniform family of the library whose size can be tuned, with its parameter set to the largest
  value whose exact bytes at ``C`` fit the same budget (sink_window, snapkv, heavy_hitter,
  compose(snapkv|sink_window + quant 4|2), mikv);
* fixed-size uniform formats (fp8, quant 8/4/2, think) once per context at their own ratio.

Real bytes are measured (``cache.nbytes()`` at the end of each sample) and reported as a fraction of
the full bf16 cache for the same tokens. Results are written after every cell, so an interrupted run
keeps what finished. Usage::

    OMP_NUM_THREADS=1 python benchmarks/planner_frontier.py --contexts 1024,2048 --samples 5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "planner_frontier.json"


DB = {"bfloat16": 2, "float32": 4}  # bytes per stored element for the model dtype (set in main)
ELEM = [2]


def fit(build, context: int, target_bytes: int, lo: int = 1, hi: int | None = None):
    """The strategy ``build(p)`` with the largest int ``p`` whose bytes at ``context`` fit (None if none)."""
    hi = hi or context
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            s = build(mid)
            s.validate_for(head_dim=64, context=context)
            ok = s.bytes_for(context, 64, ELEM[0]) <= target_bytes
        except ValueError:
            ok = False
        if ok:
            best, lo = s, mid + 1
        else:
            hi = mid - 1
    return best


def tunable(context: int, budget: float) -> dict[str, Any]:
    from kvcompile.strategies import REGISTRY, HeavyHitter, Quant, SinkWindow, SnapKV

    per_head = int(budget * 2 * context * 64 * 2)  # bf16 K+V of one head at `context` tokens
    fams = {
        "sink_window": lambda n: SinkWindow(sinks=4, window=n),
        "snapkv": lambda n: SnapKV(budget=n, obs_window=32),
        "heavy_hitter": lambda n: HeavyHitter(budget=n, recent=max(1, n // 2)),
    }
    if "compose" in REGISTRY:
        for bits in (4, 2):
            comp = REGISTRY["compose"]
            fams[f"compose(snapkv+q{bits})"] = (
                lambda n, b=bits, c=comp: c(select=SnapKV(budget=n, obs_window=32), quant=Quant(bits=b)))
            fams[f"compose(sink+q{bits})"] = (
                lambda n, b=bits, c=comp: c(select=SinkWindow(sinks=4, window=n), quant=Quant(bits=b)))
    if "mikv" in REGISTRY:
        fams["mikv"] = lambda n: REGISTRY["mikv"](select=HeavyHitter(budget=n, recent=max(1, n // 2)))
    return {name: fit(b, context, per_head) for name, b in fams.items()}


def fixed() -> dict[str, Any]:
    from kvcompile.strategies import FP8, REGISTRY, Quant

    out = {"fp8": FP8(), "quant8": Quant(bits=8), "quant4": Quant(bits=4), "quant2": Quant(bits=2)}
    if "think" in REGISTRY:
        out["think0.25"] = REGISTRY["think"](keep_ratio=0.25)
    return out


def _ratio(a: float | None, b: float) -> float | None:
    return None if a is None else a / b


def evaluate(loaded, plan, context: int, samples: int, ppl_target: int) -> dict[str, Any]:
    from kvcompile.eval.tasks import passkey_accuracy, perplexity

    t0 = time.perf_counter()
    pk = passkey_accuracy(loaded.model, loaded.tokenizer, plan, length=context, samples=samples)
    pp = perplexity(loaded.model, loaded.tokenizer, plan, context=context - ppl_target, target=ppl_target)
    bf16_per_token = 2 * 30 * 3 * 64 * 2
    return {
        "passkey": pk.accuracy,
        "passkey_n": pk.n,
        "passkey_answers": [d["generated"] for d in pk.details],
        "ppl": pp.ppl,
        "kv_ratio_bf16_measured": _ratio(pk.kv_bytes, bf16_per_token * pk.tokens),
        "kv_ratio_bf16_measured_ppl": _ratio(pp.kv_bytes, bf16_per_token * pp.tokens),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = sorted({c["context"] for c in results["cells"]})
    fig, axes = plt.subplots(2, len(ctxs), figsize=(6 * len(ctxs), 8), squeeze=False)
    for j, ctx in enumerate(ctxs):
        cells = [c for c in results["cells"] if c["context"] == ctx and c.get("passkey") is not None]
        methods = sorted({c["method"] for c in cells})
        for row, key in enumerate(("passkey", "ppl")):
            ax = axes[row][j]
            for m in methods:
                pts = sorted((c["kv_ratio_bf16_measured"] or c["kv_ratio_bf16_predicted"], c[key])
                             for c in cells if c["method"] == m)
                style = dict(marker="*", ms=14, lw=2.5, color="crimson") if m == "planner" else \
                    dict(marker="o", ms=5, lw=1, alpha=0.7)
                if m == "full":
                    style = dict(marker="s", ms=8, color="black")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **style)
            ax.set_xscale("log")
            ax.set_xlabel("KV bytes / full bf16 (measured)")
            ax.set_ylabel("passkey accuracy" if key == "passkey" else "perplexity")
            if key == "ppl":
                full = [c["ppl"] for c in cells if c["method"] == "full"]
                if full:
                    ax.set_ylim(full[0] * 0.95, full[0] * 2.0)
            ax.set_title(f"SmolLM2-135M, {ctx} tokens, question-agnostic")
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,2048")
    ap.add_argument("--budgets", default="0.25,0.125,0.08")
    ap.add_argument("--samples", type=int, default=5, help="passkey samples per cell")
    ap.add_argument("--ppl-target", type=int, default=256)
    ap.add_argument("--methods", default="", help="comma list to restrict (planner, full, uniform names)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DB),
                    help="model (and so cache) dtype; budgets are fractions of a full bf16 cache either way")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from kvcompile import optimize
    from kvcompile.eval.tasks import machine_info
    from kvcompile.models import load
    from kvcompile.runtime import uniform_plan

    loaded = load("smollm2-135m", dtype=getattr(torch, args.dtype))
    ELEM[0] = DB[args.dtype]
    out = Path(args.out)
    keep = set(filter(None, args.methods.split(",")))
    results: dict[str, Any] = {
        "description": __doc__.split("\n\n")[0],
        "model": f"smollm2-135m ({args.dtype})", "setting": "question-agnostic",
        "samples_per_cell": args.samples,
        "ppl": f"last {args.ppl_target} tokens of a context-length prose window (eval harness text)",
        "machine": {**machine_info(), "python": platform.python_version()},
        "cells": [],
    }
    if out.is_file():  # resume: keep finished cells
        old = json.loads(out.read_text())
        results["cells"] = [c for c in old.get("cells", []) if c.get("passkey") is not None]
    done = {(c["context"], c["budget"], c["method"]) for c in results["cells"]}

    def record(cell: dict[str, Any]) -> None:
        results["cells"].append(cell)
        results["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        brief = {k: v for k, v in cell.items() if k not in ("passkey_answers", "spec", "plan_mix")}
        print(json.dumps(brief), flush=True)
        plot(results, out.with_suffix(".png"))

    def want(ctx, b, m):
        return (ctx, b, m) not in done and (not keep or m in keep or m.split("(")[0] in keep)

    for ctx in map(int, args.contexts.split(",")):
        if want(ctx, None, "full"):
            record({"context": ctx, "budget": None, "method": "full", "kv_ratio_bf16_predicted": ELEM[0] / 2,
                    **evaluate(loaded, None, ctx, args.samples, args.ppl_target)})
        budgets = list(map(float, args.budgets.split(",")))
        for b in budgets:  # the planner first: it is what the benchmark is about
            if want(ctx, b, "planner"):
                t0 = time.perf_counter()
                plan = optimize(loaded, target="h100", context=ctx, kv_budget=b, verify=False, progress=True)
                compile_s = time.perf_counter() - t0
                mix: dict[str, int] = {}
                for layer in plan.layers:
                    for h in layer.heads:
                        mix[h["name"]] = mix.get(h["name"], 0) + 1
                plan.save(out.parent / f"planner_frontier_{ctx}_{b}.kvplan")
                record({"context": ctx, "budget": b, "method": "planner", "compile_s": round(compile_s, 1),
                        "kv_ratio_bf16_predicted": plan.predicted["kv_bytes_at_context"]
                        / plan.predicted["full_bf16_kv_bytes_at_context"],
                        "plan_mix": mix, **evaluate(loaded, plan, ctx, args.samples, args.ppl_target)})
        for b in budgets:
            for name, s in tunable(ctx, b).items():
                if s is None or not want(ctx, b, name):
                    continue
                plan = uniform_plan(loaded.model, s, context=ctx)
                ratio = s.bytes_for(ctx, 64, ELEM[0]) / (2 * ctx * 64 * 2)
                record({"context": ctx, "budget": b, "method": name, "spec": s.to_spec(),
                        "kv_ratio_bf16_predicted": ratio,
                        **evaluate(loaded, plan, ctx, args.samples, args.ppl_target)})
        for name, s in fixed().items():
            if not want(ctx, None, name):
                continue
            plan = uniform_plan(loaded.model, s, context=ctx)
            ratio = s.bytes_for(ctx, 64, ELEM[0]) / (2 * ctx * 64 * 2)
            record({"context": ctx, "budget": None, "method": name, "spec": s.to_spec(),
                    "kv_ratio_bf16_predicted": ratio,
                    **evaluate(loaded, plan, ctx, args.samples, args.ppl_target)})
    results["complete"] = True
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
