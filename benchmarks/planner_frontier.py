"""Planner frontier on SmolLM2: the compiled per-head plan vs uniform strategies and question-agnostic
eviction baselines at the same real bytes, per task family, on workloads the planner never saw.

Workload: the ``test`` split of :mod:`kvcompile.eval.suite` (five families: ``single`` fact retrieval
in digits / words / codes, ``multi`` facts with distractors, ``twohop`` lookups, ``followup`` second
turn on the same cache, ``lm`` perplexity of the last 128 tokens). The planner calibrates on the ``calib``
split and (not here: ``verify=False``) verifies on ``verify``: other phrasings, names and filler texts.
Question-agnostic: the context goes through the cache before the question is seen.

Methods per (context, budget = fraction of the full bf16 cache at that context):

* ``planner``: ``kvcompile.optimize(model, context=C, kv_budget=b)``, compiled once per context/budget;
* baselines, each sized to the largest parameter whose exact bytes at ``C`` fit the budget:
  ``streaming`` (StreamingLLM sinks + window), ``snapkv``, ``h2o``, ``tova`` (evict by the last context
  query's attention: SnapKV with a 1-query window and no pooling), ``knorm`` (lowest key norms),
  ``kvzip`` (context reconstruction), ``snapkv+q2`` / ``sink+q2`` (selection + 2-bit KIVI codes), and
  the fixed-size uniform ``quant2`` / ``quant4`` where their ratio is at most the budget.

Stages (work is done in this order; ``--shard i/n`` takes every n-th unit; rows are appended to
``results/planner_frontier.shard<i>.json`` after each sample and skipped when present, so a run resumes):
1. 1k: full, planner (0.25, 0.125), ``--n`` samples per family;  2. 1k: every baseline, ``--screen``
samples per family;  3. 2k: full and planner;  4. 2k: baselines screened;  5. 1k and 2k: the three
strongest baselines per cell (by the screened pooled accuracy) up to ``--n``;  6. 4k: full and planner.
With ``--fixed``, stage 5 is replaced by named baselines run to ``--n``, and ``--n-more N`` then takes
full and the planner at 1k and 2k on to N samples per family. ``--merge`` writes
``results/planner_frontier.json`` (per cell and family: n, accuracy or ppl, measured bytes) and the PNG.
Usage::

    OMP_NUM_THREADS=1 python benchmarks/planner_frontier.py --shard 0/2 &
    OMP_NUM_THREADS=1 python benchmarks/planner_frontier.py --shard 1/2 &
    python benchmarks/planner_frontier.py --merge
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
RES = ROOT / "results"
OUT = RES / "planner_frontier.json"
HEAD_DIM, BF16 = 64, 2
BASELINES = ("streaming", "snapkv", "h2o", "tova", "knorm", "kvzip", "snapkv+q2", "sink+q2", "quant2", "quant4")


def fit(build, context: int, target_bytes: int):
    """``build(p)`` with the largest int ``p`` whose bytes at ``context`` fit ``target_bytes`` (None if none)."""
    lo, hi, best = 1, context, None
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            s = build(mid)
            s.validate_for(head_dim=HEAD_DIM, context=context)
            ok = s.bytes_for(context, HEAD_DIM, BF16) <= target_bytes
        except ValueError:
            ok = False
        if ok:
            best, lo = s, mid + 1
        else:
            hi = mid - 1
    return best


def baseline(name: str, context: int, budget: float):
    from kvcompile.strategies import Compose, HeavyHitter, KNorm, KVzip, Quant, SinkWindow, SnapKV

    per_head = int(budget * 2 * context * HEAD_DIM * BF16)
    builders = {
        "streaming": lambda n: SinkWindow(sinks=4, window=n),
        "snapkv": lambda n: SnapKV(budget=n, obs_window=32),
        "h2o": lambda n: HeavyHitter(budget=n, recent=max(1, n // 2)),
        "tova": lambda n: SnapKV(budget=n, obs_window=1, pool_kernel=1),
        "knorm": lambda n: KNorm(budget=n),
        "kvzip": lambda n: KVzip(budget=n),
        "snapkv+q2": lambda n: Compose(select=SnapKV(budget=n, obs_window=32), quant=Quant(bits=2, group=32)),
        "sink+q2": lambda n: Compose(select=SinkWindow(sinks=4, window=n), quant=Quant(bits=2, group=32)),
    }
    if name in builders:
        return fit(builders[name], context, per_head)
    fixed = {"quant2": Quant(bits=2, group=32), "quant4": Quant(bits=4, group=32)}[name]
    return fixed if fixed.bytes_for(context, HEAD_DIM, BF16) <= per_head else None


# ---- work list ------------------------------------------------------------------------------------
def units(args, ranking) -> list[tuple[int, float | None, str, str, int]]:
    """(context, budget, method, family, sample index) in priority order (module docstring)."""
    from kvcompile.eval.suite import FAMILIES

    budgets = [float(b) for b in args.budgets.split(",")]
    out: list[tuple[int, float | None, str, str, int]] = []

    def cells(ctx, methods, n, start=0):
        # sample-major across the given cells: partial runs stay balanced over families and methods
        for i in range(start, n):
            for b, m in methods:
                for fam in FAMILIES:
                    out.append((ctx, b, m, fam, i))

    def core(ctx, n=None, start=0):
        cells(ctx, [(None, "full")] + [(b, "planner") for b in budgets], n or args.n, start)

    def screen(ctx):
        cells(ctx, [(b, m) for b in budgets for m in BASELINES], args.screen)

    def top3(ctx):
        cells(ctx, [(b, m) for b in budgets for m in ranking(ctx, b)[:3]], args.n, args.screen)

    if args.fixed:  # the CPU-bound order: bar cells first, baselines named up front instead of screened
        fixed = [tuple(x.split("@")) for x in args.fixed.split(",")]
        core(1024)
        core(2048)
        cells(1024, [(float(b), m) for m, b in fixed], args.n)
        cells(1024, [(b, m) for b in budgets for m in ("streaming", "tova", "knorm", "kvzip")
                     if (m, str(b)) not in fixed], args.screen)
        cells(2048, [(float(b), m) for m, b in fixed], args.n)
        core(4096)
        if args.n_more > args.n:  # then full and planner at 1k and 2k to --n-more, where the bar is decided
            core(1024, args.n_more, args.n)
            core(2048, args.n_more, args.n)
        return out
    core(1024)
    screen(1024)
    core(2048)
    screen(2048)
    top3(1024)
    top3(2048)
    core(4096)
    return out


# ---- results --------------------------------------------------------------------------------------
def shard_path(i: int) -> Path:
    return RES / f"planner_frontier.shard{i}.json"


def all_rows() -> list[dict[str, Any]]:
    rows, seen = [], set()
    for p in sorted(RES.glob("planner_frontier.shard*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for r in data["rows"]:
            k = key(r)
            if k not in seen:
                seen.add(k)
                rows.append(r)
    return rows


def key(r) -> tuple:
    return (r["context"], r["budget"], r["method"], r["family"], r["index"])


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple, list] = {}
    for r in rows:
        cells.setdefault((r["context"], r["budget"], r["method"]), []).append(r)
    out = []
    for (ctx, b, m), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] or 9, kv[0][2])):
        fams: dict[str, Any] = {}
        for fam in sorted({r["family"] for r in rs}):
            fr = [r for r in rs if r["family"] == fam]
            if fam == "lm":
                tok = sum(r["tokens"] for r in fr)
                fams[fam] = {"n": len(fr), "ppl": math.exp(sum(r["nll"] for r in fr) / tok)}
            else:
                fams[fam] = {"n": len(fr), "accuracy": sum(bool(r["correct"]) for r in fr) / len(fr)}
        accs = [v["accuracy"] for f, v in fams.items() if f != "lm"]
        ratios = [r["kv_ratio_measured"] for r in rs if r.get("kv_ratio_measured") is not None]
        exact = [r["kv_ratio_bf16_exact"] for r in rs if r.get("kv_ratio_bf16_exact") is not None]
        out.append({"context": ctx, "budget": b, "method": m, "spec": rs[0].get("spec"),
                    "pooled_accuracy": sum(accs) / len(accs) if accs else None,
                    "pooled_families": len(accs), "families": fams,
                    "kv_ratio_bf16_exact": exact[0] if exact else None,
                    "kv_ratio_measured_fp32": sum(ratios) / len(ratios) if ratios else None})
    return out


def ranking_from(rows):
    cells = summarize(rows)

    def rank(ctx, b):
        cand = [c for c in cells if c["context"] == ctx and c["budget"] == b and c["method"] in BASELINES
                and c["pooled_accuracy"] is not None]
        cand.sort(key=lambda c: (-c["pooled_accuracy"], c["families"].get("lm", {}).get("ppl", 1e9)))
        return [c["method"] for c in cand]
    return rank


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = sorted({c["context"] for c in cells})
    if not ctxs:
        return
    fig, axes = plt.subplots(2, len(ctxs), figsize=(6 * len(ctxs), 8), squeeze=False)
    for j, ctx in enumerate(ctxs):
        here = [c for c in cells if c["context"] == ctx]
        for row, what in enumerate(("pooled_accuracy", "ppl")):
            ax = axes[row][j]
            for m in sorted({c["method"] for c in here}):
                pts = []
                for c in here:
                    if c["method"] != m:
                        continue
                    y = c["pooled_accuracy"] if what == "pooled_accuracy" else c["families"].get("lm", {}).get("ppl")
                    x = c["kv_ratio_bf16_exact"]
                    if y is not None and x is not None:
                        pts.append((x, y))
                pts.sort()
                style: dict[str, Any] = {"marker": "o", "ms": 5, "lw": 1, "alpha": 0.7}
                if m == "planner":
                    style = {"marker": "*", "ms": 14, "lw": 2.5, "color": "crimson"}
                elif m == "full":
                    style = {"marker": "s", "ms": 8, "color": "black"}
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **style)
            ax.set_xscale("log")
            ax.set_xlabel("KV bytes / full bf16 cache (exact, at context)")
            ax.set_ylabel("accuracy pooled over 4 retrieval families" if row == 0 else "lm perplexity")
            ax.set_title(f"SmolLM2-135M, {ctx} tokens, test split, question-agnostic")
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def paired_full(rows: list[dict[str, Any]], ctx: int, b: float | None, m: str) -> dict[str, Any]:
    """Full-cache accuracy per family on exactly the samples (family, index) that cell ran: a paired
    comparison when the cell has fewer samples than the full cache."""
    ran = {(r["family"], r["index"]) for r in rows if (r["context"], r["budget"], r["method"]) == (ctx, b, m)}
    full = [r for r in rows if r["context"] == ctx and r["method"] == "full" and (r["family"], r["index"]) in ran
            and r["family"] != "lm"]
    fams: dict[str, list[bool]] = {}
    for r in full:
        fams.setdefault(r["family"], []).append(bool(r["correct"]))
    acc = {f: sum(v) / len(v) for f, v in fams.items()}
    return {"families": acc, "pooled": sum(acc.values()) / len(acc) if acc else None}


def bar(cells: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's bar per (context, budget): at 25 % pooled accuracy within 0.05 of full, no family more
    than 0.15 below, ppl <= +3 %; at 12.5 % pooled >= 80 % of full and above every baseline. n per cell."""
    out = []
    for ctx in sorted({c["context"] for c in cells}):
        full = next((c for c in cells if c["context"] == ctx and c["method"] == "full"), None)
        for plan in (c for c in cells if c["context"] == ctx and c["method"] == "planner"):
            if full is None or plan["pooled_accuracy"] is None:
                continue
            b = plan["budget"]
            gaps = {f: full["families"][f]["accuracy"] - v["accuracy"] for f, v in plan["families"].items()
                    if f != "lm" and f in full["families"]}
            ppl = plan["families"].get("lm", {}).get("ppl")
            ppl_full = full["families"].get("lm", {}).get("ppl")
            base = {c["method"]: c["pooled_accuracy"] for c in cells
                    if c["context"] == ctx and c["budget"] == b and c["method"] in BASELINES}
            row: dict[str, Any] = {
                "context": ctx, "budget": b, "pooled_plan": plan["pooled_accuracy"],
                "pooled_full": full["pooled_accuracy"], "family_gaps": gaps,
                "full_on_the_same_samples": paired_full(rows, ctx, b, "planner"),
                "ppl_delta": None if ppl is None or ppl_full is None else ppl / ppl_full - 1,
                "n_plan": {f: v["n"] for f, v in plan["families"].items()},
                "n_full": {f: v["n"] for f, v in full["families"].items()},
                "baselines_pooled": base,
                "baselines_n": {c["method"]: min(v["n"] for v in c["families"].values()) for c in cells
                                if c["context"] == ctx and c["budget"] == b and c["method"] in BASELINES},
            }
            if b == 0.25:
                row["meets"] = bool(full["pooled_accuracy"] - plan["pooled_accuracy"] <= 0.05
                                    and all(g <= 0.15 for g in gaps.values())
                                    and row["ppl_delta"] is not None and row["ppl_delta"] <= 0.03)
            elif b == 0.125:
                row["meets"] = bool(plan["pooled_accuracy"] >= 0.8 * full["pooled_accuracy"]
                                    and all(plan["pooled_accuracy"] > v for v in base.values() if v is not None))
            out.append(row)
    return out


def merge() -> int:
    from kvcompile.eval.tasks import machine_info

    rows = all_rows()
    cells = summarize(rows)
    result = {
        "description": __doc__.split("\n\n")[0],
        "model": "smollm2-135m (float32 compute; bytes accounted for a bfloat16 cache)",
        "setting": "question-agnostic, test split of kvcompile.eval.suite",
        "machine": {**machine_info(), "python": platform.python_version()},
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cells": cells,
        "compile": [r for r in rows if r.get("compile_s") is not None and r["family"] == "single"
                    and r["index"] == 0],
    }
    result["bar"] = bar(cells, rows)
    OUT.write_text(json.dumps(result, indent=1))
    plot(cells, OUT.with_suffix(".png"))
    print(json.dumps(result["bar"], indent=1))
    for c in cells:
        fams = " ".join(f"{f}={v.get('accuracy', v.get('ppl')):.3g}(n{v['n']})" for f, v in c["families"].items())
        pooled = c["pooled_accuracy"]
        ratio = c["kv_ratio_bf16_exact"]
        print(f"{c['context']:5d} {str(c['budget']):6s} {c['method']:10s} "
              f"pooled={'-' if pooled is None else f'{pooled:.3f}'} ratio={'-' if ratio is None else f'{ratio:.3f}'} "
              f"{fams}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="0.25,0.125")
    ap.add_argument("--n", type=int, default=10, help="samples per family for full / planner / top-3 baselines")
    ap.add_argument("--n-more", type=int, default=0,
                    help="with --fixed: afterwards, full and planner at 1k and 2k up to this many samples per family")
    ap.add_argument("--screen", type=int, default=4, help="samples per family when screening baselines")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--compile-only", action="store_true", help="compile the planner's plans and exit")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip planner cells until a --compile-only process has written their plan")
    ap.add_argument("--fixed", default="",
                    help="METHOD@BUDGET,...: baselines run to --n without screening (then the question-agnostic "
                         "eviction baselines to --screen), for machines that cannot afford the screening")
    ap.add_argument("--deadline", default="", help="HH:MM UTC: stop starting new units after this")
    args = ap.parse_args(argv)
    if args.merge:
        return merge()
    torch.set_num_threads(1)
    i, n = map(int, args.shard.split("/"))

    from kvcompile import optimize
    from kvcompile.eval.suite import make_sample, run_sample
    from kvcompile.models import load
    from kvcompile.plan import PlanError
    from kvcompile.plan import load as load_plan
    from kvcompile.runtime import make_cache, uniform_plan

    # fp32 compute (bf16 matmuls are ~5x slower on this CPU); every byte count is for a bf16 cache: the
    # planner accounts its stores in bf16 (kv_dtype) and each cell's exact bf16 ratio is the strategies'
    # bytes_for(context, 64, 2); the fp32 bytes the runtime really held are reported as well
    loaded = load("smollm2-135m", dtype=torch.float32)
    path = shard_path(i)
    mine: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    done = {key(r) for r in mine["rows"]} | {key(r) for r in all_rows()}  # rows of any shard (resharded runs)
    plans: dict[tuple, Any] = {}
    fp32_per_token = 2 * 30 * 3 * HEAD_DIM * 4

    def plan_for(ctx, b, m):
        if (ctx, b, m) in plans:
            return plans[(ctx, b, m)]
        extra: dict[str, Any] = {}
        if m == "full":
            p = None
        elif m == "planner":
            f = RES / f"planner_frontier_{ctx}_{b}.kvplan"
            t0 = time.perf_counter()
            p = None
            if f.is_file():
                try:
                    p = load_plan(f)
                except PlanError as e:  # stale against the current code: compile again
                    print(f"stale plan {f.name}: {e}", flush=True)
            if p is None and args.no_compile:
                return None, {"skip": True, "retry": True}  # the --compile-only process will write it
            if p is None:
                p = optimize(loaded, target="h100", context=ctx, kv_budget=b, verify=False, progress=True,
                             kv_dtype="bfloat16")
                p.save(f)
            extra = {"compile_s": round(time.perf_counter() - t0, 1), "spec": {"plan": f.name},
                     "kv_ratio_bf16_exact": p.predicted["kv_bytes_at_context"]
                     / p.predicted["full_bf16_kv_bytes_at_context"]}
        else:
            s = baseline(m, ctx, b)
            p = None if s is None else uniform_plan(loaded.model, s, context=ctx)
            extra = {"spec": None if s is None else s.to_spec()}
            if s is None:
                extra["skip"] = True
            else:
                extra["kv_ratio_bf16_exact"] = s.bytes_for(ctx, HEAD_DIM, BF16) / (2 * ctx * HEAD_DIM * BF16)
        plans[(ctx, b, m)] = (p, extra)
        return plans[(ctx, b, m)]

    if args.compile_only:
        for ctx in (1024, 2048, 4096):
            for b in map(float, args.budgets.split(",")):
                plan_for(ctx, b, "planner")
        return 0

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(mine))
        tmp.replace(path)

    k = 0
    todo = units(args, ranking_from(all_rows()))
    idx = 0
    while idx < len(todo):
        u = todo[idx]
        idx += 1
        if args.deadline and time.strftime("%H:%M", time.gmtime()) >= args.deadline:
            print("deadline reached", flush=True)
            break
        k += 1
        if (k - 1) % n != i or u in done:
            continue
        ctx, b, m, fam, j = u
        p, extra = plan_for(ctx, b, m)
        if extra.get("skip"):
            continue
        s = make_sample(loaded.tokenizer, fam, "test", ctx, j)
        t0 = time.perf_counter()
        if m == "planner":  # a bf16-deployment plan run on its fp32 calibration copy: relabel in memory only
            p = p.model_copy(update={"model": p.model.model_copy(update={"dtype": "float32"}), "schedule": None,
                                     "kernels": None})  # re-lowered for float32 by the runtime
        try:
            cache = None if p is None else make_cache(p, loaded.model)
        except PlanError as e:  # the runtime changed under a compiled plan (kernel sources): compile again
            if m != "planner":
                raise
            print(f"stale plan at make_cache: {e}", flush=True)
            (RES / f"planner_frontier_{ctx}_{b}.kvplan").unlink(missing_ok=True)
            plans.pop((ctx, b, m), None)
            p, extra = plan_for(ctx, b, m)
            cache = make_cache(p, loaded.model)
        r = run_sample(loaded.model, loaded.tokenizer, s, cache)
        r.update(context=ctx, budget=b, method=m, index=j, wall_s=round(time.perf_counter() - t0, 1), **extra)
        extra.pop("compile_s", None)
        # real bytes held at the end of the sample (fp32 stores) over a full fp32 cache of the same tokens
        r["kv_ratio_measured"] = None if r.get("kv_bytes") is None else r["kv_bytes"] / (fp32_per_token * s.length)
        if m == "full":
            r["kv_ratio_bf16_exact"] = 1.0
        mine["rows"].append(r)
        done.add(u)
        save()
        show = ("context", "budget", "method", "family", "index", "correct", "nll", "kv_ratio_bf16_exact",
                "kv_ratio_measured", "wall_s")
        print(json.dumps({kk: r.get(kk) for kk in show}), flush=True)
        if idx == len(todo) or todo[idx][:3] != u[:3]:
            # re-plan the remaining work once a cell ends: the top-3 ranking may have changed
            rest = units(args, ranking_from(all_rows()))
            todo, idx = rest, 0
            k = 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
