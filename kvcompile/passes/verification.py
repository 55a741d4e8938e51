"""Run the solved plan end to end on held-out workloads and record what it really does, per family.

``facts["measured"]`` (copied into ``Plan.measured``) gets, on the calibration set's ``heldout`` samples
(the shared task library :mod:`kvcompile.eval.suite`, its ``verify`` split: phrasings, names and filler
texts disjoint from calibration's, and families calibration never saw) built at the plan's context
(capped at ``options["verify_tokens"]``, default 1024; the first ``options["verify_samples"]``, default
all five: one per family, more cycle the list with seeds + 1000; a plan for a longer context is verified
with its token budgets rescaled to that length, noted, except a serving engine's plan, whose windows are
absolute), question-agnostic (the context goes through the plan's cache before the question):

* ``families``: per family ``{"n", "full", "plan"}``: retrieval accuracy (``single``, ``multi``,
  ``twohop``, ``followup``) or perplexity of the continuation (``lm``), full cache vs the plan;
* ``accuracy_full`` / ``accuracy_plan``: pooled over the retrieval families; ``ppl_full``, ``ppl_plan``,
  ``ppl_delta`` (= ppl_plan / ppl_full - 1) from ``lm``.

With ``config.tolerance`` every family must be within it: ``ppl_delta <= tolerance`` and, per retrieval
family, ``plan >= full - tolerance``. A failing plan is re-solved with the damage of its lossy choices
multiplied by 4 (``facts["damage_scale"]``) for at most ``options["verify_iterations"]`` (default 3)
rounds; the best measured plan is kept and a failure is stated in ``notes``. Full-cache results do not
depend on the plan and are memoised on disk separately (``models.cache_dir()/verify``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from ..ir import Program
from ..strategies import from_spec
from ._workers import fork_map, worker_count
from .calibration import rescale
from .calibration_set import load_set
from .context import ASSIGNMENT, PassContext, contract
from .solve import predict_costs, solve_assignment

TIGHTEN = 4.0
VERIFY_VERSION = 2


def _plan_cache(model: Any, assignment, context: int):
    from ..runtime import make_cache
    from ..runtime.builders import plan_for

    plan = plan_for(model, lambda layer, head: dict(assignment[layer][head]), context)
    return make_cache(plan, model)


def _memo_path(body: dict[str, Any]) -> Path:
    from ..models import cache_dir

    key = hashlib.sha256(json.dumps({"v": VERIFY_VERSION, **body}, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "verify" / f"{key}.json"


def _memo_get(ctx: PassContext, path: Path) -> Any:
    if ctx.options.get("calibration_cache", True) and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _memo_put(ctx: PassContext, path: Path, rows: Any) -> None:
    if ctx.options.get("calibration_cache", True):
        from .._io import write_atomic  # readers see the old entry or the whole new one

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(rows))


def combine(full: list[dict[str, Any]], plan: list[dict[str, Any]], tokens: int, seconds: float) -> dict[str, Any]:
    """Per-family full-vs-plan numbers (module docstring) from :func:`kvcompile.eval.suite.run_sample` rows."""
    from ..eval.suite import summarize

    sf, sp = summarize(full), summarize(plan)
    fams: dict[str, Any] = {}
    for fam, v in sf.items():
        if fam == "pooled":
            continue
        key = "ppl" if fam == "lm" else "accuracy"
        fams[fam] = {"n": v["n"], "metric": key, "full": v[key], "plan": sp[fam][key]}
    out: dict[str, Any] = {"samples": len(full), "tokens": tokens, "seconds": round(seconds, 2), "families": fams}
    if "pooled" in sf:
        out.update(accuracy_full=sf["pooled"]["accuracy"], accuracy_plan=sp["pooled"]["accuracy"])
    if "lm" in fams:
        pf, pp = fams["lm"]["full"], fams["lm"]["plan"]
        out.update(ppl_full=pf, ppl_plan=pp, ppl_delta=pp / pf - 1 if math.isfinite(pf) else None)
    return out


ANSWER_HEADROOM = 64  # generated tokens per sample (answers, follow-up turns) above its prompt ids


def measure(ctx: PassContext, fingerprint: str, assignment, samples: list[Any], tokens: int) -> dict[str, Any]:
    """Full cache vs ``assignment`` on ``samples`` (suite ``Sample``s); both halves memoised on disk. The
    runs that are not memoised are spread over worker processes (:mod:`._workers`), rows in order."""
    from tqdm.auto import tqdm

    from ..eval.suite import run_sample

    t0 = time.perf_counter()
    model, tok = ctx.model, ctx.tokenizer
    ids = [s.ids[0].tolist() + list(s.meta.get("followup", ())) for s in samples]
    plan_rows = [[dict(x) for x in row] for row in assignment]
    # the cache's byte ceiling must cover prompt + questions + generated answers (token budgets are already
    # rescaled to ``tokens``); a ceiling of ``tokens`` alone overflows with a PlanWarning on every sample
    ceiling = max(len(i) for i in ids) + ANSWER_HEADROOM
    keys = {"full": _memo_path({"fp": fingerprint, "s": ids, "n": tokens, "full": True}),
            "plan": _memo_path({"fp": fingerprint, "s": ids, "n": tokens, "a": plan_rows})}
    got = {half: _memo_get(ctx, path) for half, path in keys.items()}
    todo = [(half, i) for half in keys if got[half] is None for i in range(len(samples))]

    def one(item: tuple[str, int]) -> dict[str, Any]:
        half, i = item
        prev = model.config._attn_implementation
        try:
            cache = None if half == "full" else _plan_cache(model, assignment, ceiling)
            return run_sample(model, tok, samples[i], cache)
        finally:
            model.set_attn_implementation(prev)

    bar = tqdm(total=len(todo), desc="verify", disable=not ctx.progress or not todo, leave=False)
    try:
        rows = fork_map(one, todo, worker_count(ctx.options.get("workers"), len(todo)),
                        on_result=lambda i, r: bar.update(1))
    finally:
        bar.close()
    for half in keys:
        if got[half] is None:
            got[half] = [r for (h, _), r in zip(todo, rows, strict=True) if h == half]
            _memo_put(ctx, keys[half], got[half])
    return combine(got["full"], got["plan"], tokens, time.perf_counter() - t0)


def failing_families(m: dict[str, Any], tolerance: float | None) -> list[str]:
    """Families outside ``tolerance`` (module docstring); without a tolerance none."""
    if tolerance is None:
        return []
    bad = []
    for fam, v in m.get("families", {}).items():
        if v["metric"] == "ppl":
            if not v["plan"] / v["full"] - 1 <= tolerance:
                bad.append(fam)
        elif v["plan"] < v["full"] - tolerance - 1e-9:
            bad.append(fam)
    return bad


def passes_tolerance(m: dict[str, Any], tolerance: float | None) -> bool:
    return not failing_families(m, tolerance)


def heldout_samples(tokenizer: Any, cset: Any, tokens: int, k: int) -> list[Any]:
    """The ``k`` suite samples ``verify_plan`` measures: the set's held-out list, cycled with seeds + 1000
    beyond its length (as ``calibration_set``'s ``NAME:N``), ``tokens`` long, from its held-out split."""
    from ..eval.suite import make_sample

    base = cset.heldout
    items = [base[i % len(base)] | {"seed": int(base[i % len(base)]["seed"]) + 1000 * (i // len(base))}
             for i in range(k if base else 0)]
    return [make_sample(tokenizer, it["kind"], cset.heldout_split, tokens, int(it["seed"])) for it in items]


@contract(requires=(ASSIGNMENT, "candidates", "damage", "solve"),
          provides=("measured", "notes", ASSIGNMENT, "solve", "predicted", "damage_scale"))
def verify_plan(program: Program, ctx: PassContext) -> Program:
    """Assumes a solved assignment (``facts["solve"]``) and a real model; else returns the program.

    Guarantees ``facts["measured"]`` with the keys in the module docstring plus ``iterations``,
    ``within_tolerance`` and ``failing``; may replace ``assignment`` by a re-solved one.
    """
    if "solve" not in program.facts or ctx.model is None or ctx.tokenizer is None or program.model.on_meta:
        return program
    if not ctx.opt("verify", True):
        return program
    cset = load_set(ctx.config.calibration)
    context = ctx.config.context
    n = min(context, int(ctx.opt("verify_tokens", 1024)))
    samples = heldout_samples(ctx.tokenizer, cset, n, int(ctx.opt("verify_samples", len(cset.heldout))))
    notes = list(program.facts.get("notes", ()))
    # a serving engine's windows are absolute token counts: an engine plan is measured as the engine runs it
    rescaled = n < context and not ctx.options.get("engine")
    if rescaled:
        notes.append(f"verified at {n} tokens (plan context {context}): token budgets rescaled by "
                     f"{n / context:.3g}")
    elif n < context:
        notes.append(f"verified at {n} tokens (plan context {context}): the engine's settings as they are")

    def run(p: Program) -> dict[str, Any]:
        assignment: Any = p.assignment
        if rescaled:
            assignment = [[rescale(from_spec(s), n / context).to_spec() for s in row] for row in assignment]
        return measure(ctx, program.model.fingerprint, assignment, samples, n)

    tol = ctx.config.tolerance

    def rank(m: dict[str, Any]) -> tuple[bool, int, float]:
        return (passes_tolerance(m, tol), -len(failing_families(m, tol)), -(m.get("ppl_delta") or 0.0))

    best, best_m = program, run(program)
    history = [best_m]
    rounds = int(ctx.opt("verify_iterations", 3)) if tol is not None else 0
    current = program
    for _ in range(rounds):
        if passes_tolerance(best_m, tol):
            break
        specs = current.facts["candidates"]["specs"]
        scale = [list(map(list, layer)) for layer in current.facts.get("damage_scale") or
                 [[[1.0] * len(specs) for _ in range(s.num_kv_heads)] for s in current.sites]]
        for li, row in enumerate(current.assignment or ()):
            for h, spec in enumerate(row):
                i = specs.index(dict(spec))
                if current.facts["damage"]["values"][li][h][i] > 0:
                    scale[li][h][i] *= TIGHTEN
        current = predict_costs(solve_assignment(current.with_facts(damage_scale=scale), ctx), ctx)
        m = run(current)
        history.append(m)
        if rank(m) > rank(best_m):
            best, best_m = current, m
    ok = passes_tolerance(best_m, tol)
    failing = failing_families(best_m, tol)
    if tol is not None and not ok:
        per = ", ".join(f"{f} {best_m['families'][f]['plan']:.3g} vs full {best_m['families'][f]['full']:.3g}"
                        for f in failing)
        notes.append(f"verification FAILED tolerance {tol} on {per} after {len(history)} solve(s)")
    measured = {**{k: v for k, v in best_m.items() if k != "seconds"}, "iterations": len(history),
                "within_tolerance": ok if tol is not None else None, "failing": failing, "tolerance": tol,
                "history": [{k: v for k, v in h.items() if k != "seconds"} for h in history]
                if len(history) > 1 else None,
                "source": f"heldout {cset.heldout_split!r} split of kvcompile.eval.suite (question-agnostic)"}
    return best.with_facts(measured=measured, notes=notes)
