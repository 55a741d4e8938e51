"""The ``kvcompile`` command line: compile, inspect, targets, serve, eval, bench.

Every expected failure (bad plan file, unknown target, unloadable model, uncapturable model, bad
setting: the documented types of :func:`is_expected`) prints one line on stderr and exits with status
2, without a traceback (``--debug`` shows it). Any other exception is a bug and keeps its traceback.

Example
-------
::

    kvcompile compile llama-3-70b --target h100-sxm:8 --context 8192 -o out/llama70b.kvplan
    kvcompile inspect out/llama70b.kvplan --batch 16
    kvcompile targets
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvcompile", description="Compile an LLM into a per-head KV-cache plan.")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors too (anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into a .kvplan file")
    c.add_argument("model", help="smollm2-135m, a config name (llama-3-70b ...), .gguf, .json or HF dir")
    c.add_argument("--target", "-t", default="h100", help="target NAME or NAME:N (see `kvcompile targets`)")
    c.add_argument("--gpus", type=int, default=None, help="GPUs in the node (overrides NAME:N)")
    c.add_argument("--context", type=int, default=4096, help="tokens per sequence the plan is built for")
    c.add_argument("--batch", type=int, default=1, help="sequences served together")
    c.add_argument("--kv-budget", type=float, default=None, help="KV budget, fraction of full bf16")
    c.add_argument("--kv-budget-bytes", type=int, default=None, help="KV budget in bytes")
    c.add_argument("--latency-budget", type=float, default=None, help="decode step latency budget in seconds")
    c.add_argument("--tolerance", type=float, default=None, help="allowed quality loss (passes/README.md)")
    c.add_argument("--objective", default="min-damage", help="planner objective")
    c.add_argument("--calibration", default=None, help="calibration set name")
    c.add_argument("--no-progress", action="store_true", help="no per-stage lines on stderr")
    c.add_argument("--engine", default=None, help="serving engine to compile for (vllm): its correct settings only")
    c.add_argument("-o", "--output", default=None, help="output file (default out/<model>.kvplan)")

    i = sub.add_parser("inspect", help="print a plan: per layer / KV head strategies and bytes, totals")
    i.add_argument("plan")
    i.add_argument("--context", type=int, default=None, help="show bytes at this context (default: plan's)")
    i.add_argument("--batch", type=int, default=None, help="show bytes at this batch (default: plan's)")
    i.add_argument("--heatmap", default=None, metavar="PNG", help="also save a layer x head heatmap")

    sub.add_parser("targets", help="list hardware targets")
    s = sub.add_parser("serve", help="serve a plan compiled with --engine vllm (OpenAI-compatible server)")
    s.add_argument("plan")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--kv-cache-memory", type=int, default=256 << 20, help="KV cache bytes for vLLM")
    s.add_argument("--model-dir", default=None, help="HF directory of the plan's model (default: found)")
    sub.add_parser("eval", help="evaluate a plan (see `kvcompile eval --help`)", add_help=False)
    sub.add_parser("bench", help="benchmark kernels (see `kvcompile bench --help`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvcompile`` console script; returns the exit status.

    Documented errors (:func:`is_expected`) print one line and exit 2; ``--debug`` (anywhere on the
    line) also prints their traceback. Any other exception is a bug in kvcompile: it propagates with
    its traceback (exit 1) instead of being dressed up as a user error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in _DELEGATES:
        return _delegate(argv[0], argv[1:], debug)
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except Exception as e:
        if not is_expected(e):
            raise
        return _fail(args.command, e, debug)


def _fail(command: str, e: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    print(f"kvcompile {command}: error: {_one_line(e)}", file=sys.stderr)
    return EXIT_USAGE


def _compile(args: argparse.Namespace) -> int:
    from .api import optimize

    t0 = time.perf_counter()
    plan = optimize(
        args.model,
        target=args.target,
        context=args.context,
        batch=args.batch,
        kv_budget=args.kv_budget,
        kv_budget_bytes=args.kv_budget_bytes,
        latency_budget_s=args.latency_budget,
        tolerance=args.tolerance,
        objective=args.objective,
        calibration=args.calibration,
        gpus=args.gpus,
        progress=not args.no_progress,
        engine=args.engine,
    )
    out = Path(args.output or f"out/{Path(args.model).stem}.kvplan")
    plan.save(out)
    dt = time.perf_counter() - t0
    from .report import fmt_bytes

    pr = plan.predicted
    t = plan.target
    m = plan.model
    print(f"model    {m.name} ({m.arch}, {len(m.sites)} attention layers, {m.dtype})")
    print(f"target   {t.name} x{t.gpus}, context {plan.config.context}, batch {plan.config.batch}")
    bf16 = "" if m.dtype == "bfloat16" else f", {pr['full_bf16_kv_bytes_per_token']} B/token (bfloat16)"
    print(f"full KV  {pr['full_kv_bytes_per_token']} B/token ({m.dtype}){bf16}")
    print(
        f"plan KV  {fmt_bytes(pr['kv_bytes_at_context'])} at context "
        f"({pr['kv_bytes_at_context'] / pr['full_kv_bytes_at_context']:.3f} x full)"
    )
    if plan.engine:
        e, ep = plan.engine, plan.engine["predicted"]
        print(f"engine   {e['name']} {e['version']} ({e['platform']}): predicted KV capacity "
              f"{ep['capacity_ratio_vs_auto']:.2f}x kv_cache_dtype=auto ({ep['tokens']} tokens in "
              f"{ep['memory_bytes'] >> 20} MiB)")
    print(f"wrote    {out} (hash {plan.content_hash[:12]}) in {dt:.1f} s")
    if pr.get("damage_source") == "priors":
        print("UNVERIFIED: strategies chosen from literature priors, not measured on this model")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .codegen.check import load
    from .report import heatmap, render_inspect

    plan = load(args.plan)
    print(render_inspect(plan, context=args.context, batch=args.batch))
    if args.heatmap:
        print(f"\nheatmap written to {heatmap(plan, args.heatmap, context=args.context, batch=args.batch)}")
        from .report import strategy_heatmap

        strat_png = str(args.heatmap).removesuffix(".png") + "-strategies.png"
        print(f"strategy heatmap written to {strategy_heatmap(plan, strat_png)}")
    return 0


def _targets(args: argparse.Namespace) -> int:
    from .report import targets_table
    from .targets import available

    print(targets_table(available()))
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Check the plan (one-line refusal, server not started), then become vLLM's OpenAI server."""
    import os

    from .codegen.check import load
    from .engines.vllm import check, serve_argv

    plan = load(args.plan)
    check(plan, model_dir=args.model_dir)
    argv = serve_argv(plan, args.plan, host=args.host, port=args.port, kv_cache_memory_bytes=args.kv_cache_memory,
                      model=args.model_dir)
    print(f"kvcompile serve: {plan.model.name} on http://{args.host}:{args.port}/v1 (plan {plan.content_hash[:12]})",
          file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv])
    return 0  # not reached


_COMMANDS = {"compile": _compile, "inspect": _inspect, "targets": _targets, "serve": _serve}
_DELEGATES = {"eval": "kvcompile.eval.cli", "bench": "kvcompile.codegen.bench"}


def _delegate(command: str, argv: list[str], debug: bool = False) -> int:
    """``kvcompile eval|bench ...`` -> ``<module>.main(argv)``, imported only when asked for."""
    module = _DELEGATES[command]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            msg = f"kvcompile {command}: not available in this install ({module} is missing)"
            print(msg, file=sys.stderr)
            return EXIT_USAGE
        raise
    try:
        return int(mod.main(argv) or 0)
    except Exception as e:
        if not is_expected(e):
            raise
        return _fail(command, e, debug)


def is_expected(e: BaseException) -> bool:
    """Whether ``e`` is a documented user-facing error (one line, exit 2) rather than a kvcompile bug.

    Documented: :class:`~kvcompile.plan.PlanError` (bad plan file, incl. ``KernelSourceError``),
    :class:`~kvcompile.plan.SettingsError` (context, batch, budgets, tolerance, objective ...),
    :class:`~kvcompile.targets.TargetError`, :class:`~kvcompile.models.ModelLoadError`,
    :class:`~kvcompile.capture.CaptureError`, :class:`~kvcompile.engines.EngineError` (a plan or setting the
    serving engine must not run), ``OSError`` (files the user named), and a
    :class:`~kvcompile.passes.PassError` whose cause is a ``ValueError`` (a pass refusing its input,
    e.g. an infeasible budget). Anything else, e.g. a ``KeyError`` inside a pass, is a bug.
    """
    from .capture import CaptureError
    from .engines import EngineError
    from .models import ModelLoadError
    from .passes import PassError
    from .plan import PlanError, SettingsError
    from .targets import TargetError

    if isinstance(e, PassError):
        return e.__cause__ is None or isinstance(e.__cause__, ValueError)
    documented = (PlanError, SettingsError, TargetError, ModelLoadError, CaptureError, EngineError, OSError)
    return isinstance(e, documented)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 400 else text[:397] + "..."


if __name__ == "__main__":
    sys.exit(main())
