"""Choose one candidate per (layer, KV head) with CP-SAT (``kvcompile.solve.heads``) under the budget."""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import cost
from ..ir import Program, SolveResult, dtype_bytes
from ..solve import HeadProblem, InfeasibleBudget, Option, solve_heads
from ..strategies import from_spec
from .context import ASSIGNMENT, PassContext, contract

PICO = 1e12  # latency terms are integer picoseconds


def budget_bytes(program: Program, ctx: PassContext) -> tuple[int, str]:
    """The per-sequence KV byte budget at the plan's context and how it was derived.

    ``kv_budget`` (fraction of an uncompressed bfloat16 cache at ``context``) or ``kv_budget_bytes``
    (absolute bytes for the whole ``batch``) or, with ``options["budget"] == "fit"``, whatever fits
    ``batch`` sequences on the target after the weights. The tightest of those given wins.
    """
    cfg = ctx.config
    found: list[tuple[int, str]] = []
    full16 = cost.full_bf16_kv_bytes(program, cfg.context)
    if cfg.kv_budget is not None:
        if cfg.kv_budget <= 0:
            raise ValueError(f"kv_budget={cfg.kv_budget} must be > 0 (a fraction of the full bf16 cache)")
        how = f"{cfg.kv_budget:g} x full bf16 KV bytes at context {cfg.context}"
        found.append((int(cfg.kv_budget * full16), how))
    if cfg.kv_budget_bytes is not None:
        if cfg.kv_budget_bytes <= 0:
            raise ValueError(f"kv_budget_bytes={cfg.kv_budget_bytes} must be > 0")
        found.append((cfg.kv_budget_bytes // cfg.batch, f"{cfg.kv_budget_bytes} bytes for batch {cfg.batch}"))
    if ctx.opt("budget") == "fit":
        free = ctx.target.memory_bytes * ctx.target.gpus - program.model.param_bytes
        found.append((max(0, free) // cfg.batch, f"fit batch {cfg.batch} on {ctx.target.spec} after weights"))
    if not found:
        return 1 << 62, "none (latency budget only)"
    return min(found)


def build_problem(program: Program, ctx: PassContext, damage: list[list[list[float]]]) -> HeadProblem:
    """The plain-data problem: per head its valid candidates with exact bytes, damage, latency, kernel."""
    cand = program.facts["candidates"]
    strategies = [from_spec(s) for s in cand["specs"]]
    context, batch = int(cand["context"]), ctx.config.batch
    bw = ctx.target.memory_bandwidth * ctx.target.gpus
    layers = []
    for site, valid, dmg in zip(program.sites, cand["per_layer"], damage, strict=True):
        db = dtype_bytes(site.dtype)
        heads = []
        for h in range(site.num_kv_heads):
            heads.append(tuple(
                Option(
                    label=str(i),
                    bytes=strategies[i].bytes_for(context, site.head_dim, db),
                    damage=max(0.0, float(dmg[h][i])),
                    latency=round(batch * cost.head_read_bytes(strategies[i], site, context) / bw * PICO),
                    kernel=strategies[i].kernel_format(),
                )
                for i in valid
            ))
        layers.append(tuple(heads))
    latency = None
    if ctx.config.latency_budget_s is not None:
        weights_s = program.model.param_bytes / bw
        latency = max(0, round((ctx.config.latency_budget_s - weights_s) * PICO))
    return HeadProblem(
        options=tuple(layers),
        budget_bytes=budget_bytes(program, ctx)[0],
        latency_budget=latency,
        max_kernels_per_layer=ctx.opt("max_kernels_per_layer"),
        time_limit_s=float(ctx.opt("solver_time_limit_s", 20.0)),
        seed=int(ctx.opt("solver_seed", 0)),
        workers=int(ctx.opt("solver_workers", 1)),
    )


def assignment_from(problem: HeadProblem, choice: tuple[tuple[int, ...], ...], specs: list[dict[str, Any]]):
    return tuple(
        tuple(dict(specs[int(problem.options[l_][h][c].label)]) for h, c in enumerate(row))
        for l_, row in enumerate(choice)
    )


@contract(requires=("candidates", "damage"), provides=("solve", ASSIGNMENT))
def solve_assignment(program: Program, ctx: PassContext) -> Program:
    """Assumes ``assign_candidates`` and ``calibrate``; sets ``assignment`` and ``facts["solve"]``.

    ``damage_scale`` in ``facts`` (``[l][h][c]`` multipliers, from ``verify_plan``'s re-solve) tightens
    the damage of chosen candidates. Raises :class:`~kvcompile.solve.InfeasibleBudget` (a ValueError)
    naming the smallest feasible budget when even the smallest candidates do not fit.
    """
    if "candidates" not in program.facts or "damage" not in program.facts:
        return program
    damage = program.facts["damage"]["values"]
    scale = program.facts.get("damage_scale")
    if scale is not None:
        damage = [[[d * m for d, m in zip(dh, mh, strict=True)] for dh, mh in zip(dl, ml, strict=True)]
                  for dl, ml in zip(damage, scale, strict=True)]
    problem = build_problem(program, ctx, damage)
    budget, how = budget_bytes(program, ctx)
    try:
        sol = solve_heads(problem)
    except InfeasibleBudget as e:
        full16 = cost.full_bf16_kv_bytes(program, ctx.config.context)
        raise InfeasibleBudget(f"{e}; as a fraction of full bf16 KV bytes: smallest feasible kv_budget = "
                               f"{problem.min_bytes() / full16:.4f} (asked: {how})") from None
    specs = program.facts["candidates"]["specs"]
    assignment = assignment_from(problem, sol.choice, specs)
    full16 = cost.full_bf16_kv_bytes(program, ctx.config.context)
    facts = SolveResult(
        status=sol.status, objective=sol.objective, bound=sol.bound, gap=sol.gap, wall_s=round(sol.wall_s, 3),
        num_vars=sol.num_vars, budget_bytes=budget, budget=how, total_bytes=sol.total_bytes,
        budget_used=sol.total_bytes / budget if budget else None,
        kv_ratio_vs_full_bf16=sol.total_bytes / full16, damage_source=program.facts["damage"]["source"],
    )
    return dataclasses.replace(program, assignment=assignment).with_facts(solve=facts)


@contract(requires=(ASSIGNMENT,), provides=("predicted",))
def predict_costs(program: Program, ctx: PassContext) -> Program:
    """Put the roofline prediction of the current assignment in ``facts["predicted"]`` (see cost.py)."""
    if program.assignment is None:
        return program
    strategies = [[from_spec(s) for s in row] for row in program.assignment]
    pred = cost.predicted(program, strategies, ctx.target, batch=ctx.config.batch, context=ctx.config.context)
    if "damage" in program.facts:
        pred["damage_source"] = program.facts["damage"]["source"]
    if any(s.name == "kvzip" for row in strategies for s in row):
        # KVzip re-reads the context once more after a full prefill (strategies/kvzip.py): the prefill
        # runs twice more over the context (the scoring prefill and the reconstruction pass)
        pred["prefill_s_without_kvzip"] = pred["prefill_s"]
        pred["prefill_s"] = 3 * pred["prefill_s"]
        pred["kvzip_prefill_passes"] = 3
    if "solve" in program.facts:
        pred["predicted_damage"] = program.facts["solve"]["objective"]
        # no wall time here: the same input must give a byte-identical plan
        pred["solver"] = {k: program.facts["solve"][k] for k in ("status", "gap", "budget", "num_vars")}
    return program.with_facts(predicted={**dict(program.facts.get("predicted", {})), **pred})
