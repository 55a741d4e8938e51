"""``kvcompile eval``: run the evaluation tasks with a plan (or a uniform strategy) and print a table.

Usage::

    kvcompile eval PLAN [--tasks passkey,niah,ppl] [--lengths 1024,2048,4096] [--samples N] [--json OUT]
    kvcompile eval PLAN --tasks single,multi,twohop,followup,lm [--split test]   # the shared task library
    kvcompile eval --uniform '{"name": "quant", "bits": 4}' [--model smollm2-135m] ...
    kvcompile eval --dynamic ...        # transformers' DynamicCache, the uncompressed reference

The CLI helper's ``kvcompile eval`` delegates here (:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .tasks import DEFAULT_TASKS, TASKS, evaluate


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _tasks(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in out if t not in TASKS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad or text!r}; choose from {','.join(TASKS)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvcompile eval", description="Evaluate a KV plan on passkey / multi-key NIAH / perplexity."
    )
    p.add_argument("plan", nargs="?", help="a .kvplan file (omit with --uniform or --dynamic)")
    p.add_argument(
        "--uniform", metavar="SPEC_JSON", help='one strategy for every KV head, e.g. \'{"name":"full"}\''
    )
    p.add_argument(
        "--dynamic", action="store_true", help="transformers' DynamicCache (uncompressed reference)"
    )
    p.add_argument("--model", default=None, help="model spec for kvcompile.models.load (default: the plan's)")
    p.add_argument("--tasks", type=_tasks, default=list(DEFAULT_TASKS),
                   help="comma list of passkey,niah,ppl and the task-library families single,multi,twohop,"
                   "followup,lm (kvcompile.eval.suite; --lengths and --samples apply)")
    p.add_argument("--split", default="test", choices=("calib", "verify", "test"),
                   help="task-library split for the families (the planner calibrates on calib, verifies on verify)")
    p.add_argument(
        "--lengths", type=_ints, default=[1024, 2048, 4096], help="passkey prompt lengths (tokens)"
    )
    p.add_argument("--samples", type=int, default=5, help="samples per passkey length and for niah")
    p.add_argument("--niah-length", type=int, default=2048)
    p.add_argument("--niah-needles", type=int, default=4)
    p.add_argument("--ppl-context", type=int, default=3584, help="tokens of context before the scored ones")
    p.add_argument("--ppl-target", type=int, default=512, help="scored tokens")
    p.add_argument("--ppl-samples", type=int, default=1, help="prose windows")
    p.add_argument("--ppl-chunk", type=int, default=32, help="scored tokens fed per forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--question-aware", action="store_true", help="one prefill of context + question")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def format_table(result: dict[str, Any]) -> str:
    """The results as an aligned text table (task, length, n, accuracy/ppl, KV ratio, wall time)."""
    rows = [("task", "length", "n", "accuracy", "ppl", "kv_bytes", "kv_ratio", "wall_s")]
    for r in result["results"]:
        rows.append(
            (
                r["task"],
                str(r["length"]),
                str(r["n"]),
                "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                "-" if r["ppl"] is None else f"{r['ppl']:.3f}",
                "-" if r["kv_bytes"] is None else f"{r['kv_bytes'] / 2**20:.2f} MiB",
                "-" if r["kv_ratio"] is None else f"{r['kv_ratio']:.3f}",
                f"{r['wall_s']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kvcompile eval``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    chosen = sum(x is not None and x is not False for x in (args.plan, args.uniform, args.dynamic or None))
    if chosen != 1:
        print("kvcompile eval: give exactly one of PLAN, --uniform SPEC_JSON, --dynamic", file=sys.stderr)
        return 2
    if args.samples < 1:
        print(f"kvcompile eval: --samples={args.samples} must be >= 1", file=sys.stderr)
        return 2

    from ..codegen.check import load as load_plan
    from ..models import load as load_model
    from ..plan import PlanError

    plan = None
    if args.plan:
        try:
            plan = load_plan(args.plan)
        except PlanError as e:
            print(f"kvcompile eval: {e}", file=sys.stderr)
            return 2
    spec = None
    if args.uniform:
        try:
            spec = json.loads(args.uniform)
        except json.JSONDecodeError as e:
            print(f"kvcompile eval: --uniform is not valid JSON: {e}", file=sys.stderr)
            return 2
    from ..models import plan_model_spec  # a plan's name never selects a local path

    model_spec = args.model or (plan_model_spec(plan.model.name) if plan is not None else "smollm2-135m")
    loaded = load_model(model_spec)
    if spec is not None:
        from ..runtime.builders import uniform_plan

        context = max([*args.lengths, args.niah_length, args.ppl_context + args.ppl_target])
        try:
            plan = uniform_plan(loaded.model, spec, context=context, name=loaded.name)
        except ValueError as e:
            print(f"kvcompile eval: --uniform: {e}", file=sys.stderr)
            return 2
    try:
        result = evaluate(
            plan,
            loaded,
            tasks=args.tasks,
            lengths=args.lengths,
            samples=args.samples,
            niah_length=args.niah_length,
            niah_needles=args.niah_needles,
            ppl_context=args.ppl_context,
            ppl_target=args.ppl_target,
            ppl_samples=args.ppl_samples,
            ppl_chunk=args.ppl_chunk,
            seed=args.seed,
            question_aware=args.question_aware,
            progress=not args.no_progress,
            split=args.split,
        )
    except ValueError as e:
        print(f"kvcompile eval: {e}", file=sys.stderr)
        return 2
    result["cache"] = (
        {"kind": "dynamic"}
        if plan is None
        else {
            "kind": "uniform" if spec is not None else "plan",
            "plan": args.plan,
            "spec": spec,
            "content_hash": plan.content_hash,
        }
    )
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
