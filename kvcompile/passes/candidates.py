"""Candidate strategies per (layer, KV head): the library's grid, filtered by the target and the site."""

from __future__ import annotations

import json
from typing import Any

from ..ir import Candidates, Program
from ..strategies import REGISTRY, Full, Quant, SinkWindow, SnapKV, Strategy, default_instances, from_spec
from ..targets import Target
from .context import PassContext, contract


def needs_solve(config: Any) -> bool:
    """A budget (fractional, absolute or latency) was requested, so strategies must be chosen."""
    fields = ("kv_budget", "kv_budget_bytes", "latency_budget_s")
    return any(getattr(config, f, None) is not None for f in fields)


def target_allows(strategy: Strategy, target: Target) -> bool:
    """Whether the target stores this format: fp8 needs ``float8_e4m3fn``, KIVI ``int<bits>``, nested
    strategies all of their parts; narrower float copies need their dtype."""
    name = strategy.name
    kv = set(target.kv_dtypes)
    if name == "fp8":
        return target.supports_fp8
    if name == "quant":
        return f"int{getattr(strategy, 'bits', 0)}" in kv
    if name == "full":
        dtype = getattr(strategy, "dtype", "model")
        return dtype == "model" or dtype in kv
    parts = [v for v in (getattr(strategy, f) for f in getattr(strategy, "__dataclass_fields__", {}))
             if isinstance(v, Strategy)]
    return all(target_allows(p, target) for p in parts)


def planner_grid(context: int) -> list[Strategy]:
    """``full`` + ``strategies.default_instances(context)`` without the candidates that cost the most
    calibration time for the least value: standalone H2O (in the question-agnostic setting SnapKV
    keeps what H2O keeps and more, SnapKV paper Table 1), MiKV (0.41 of bf16 at 1k: between fp8 and
    4-bit KIVI, which the solver mixes per head for less; its H2O scoring is the costliest to
    calibrate) and token selections keeping half the context (dominated by quantization at the same
    bytes). KVzip is a baseline, not a candidate: its reconstruction pass triples the prefill and it
    retrieved nothing at 25 % of the bytes in benchmarks/planner_frontier.py (0 of 12 retrieval
    samples at 1k, n = 3 per family)."""
    out: list[Strategy] = [Full()]
    for s in default_instances(context):
        half = isinstance(s, (SnapKV, SinkWindow)) and s.kept(context) > context // 3
        if s.name in ("heavy_hitter", "mikv") or half:
            continue
        out.append(s)
    # KIVI codes with half the float16 scale/zero overhead (key groups of 64 tokens, one value group per
    # token: 0.5 instead of 1 extra bit per element) and no residual beyond the partial key group: K4V2
    # then holds every token in 22 % of the bf16 bytes where the g32 codes must evict; the solver weighs
    # their larger error per head (KIVI's R trades bytes for the newest tokens' precision)
    lean4, lean42 = (Quant(bits=4, v_bits=vb, group=64, v_group=64, residual=0) for vb in (None, 2))
    out += [lean4, lean42]
    # int8 copies of the kept tokens (near lossless, KIVI) double what a selection keeps at equal bytes;
    # selections of 3/4 .. 1/4 of the tokens under the lean codes keep ~1.1x the tokens of the g32
    # compositions at equal bytes and fill the steps between them
    comp: Any = REGISTRY.get("compose")
    if comp is not None:
        def n(frac: float) -> int:
            return max(8, int(context * frac))

        q8 = Quant(bits=8)
        pairs: list[tuple[SnapKV | SinkWindow, Quant]] = []
        for frac in (0.25, 0.125):
            pairs += [(SnapKV.keeping(n(frac)), q8), (SinkWindow(sinks=4, window=n(frac) - 4), q8)]
        pairs += [(SnapKV.keeping(n(frac)), lean4) for frac in (0.75, 0.5, 0.375, 0.25)]
        pairs.append((SnapKV.keeping(n(0.5)), lean42))
        for sel, q in pairs:
            if sel.cap() >= q.r + q.group:  # short contexts: only where something is quantized (Compose.check)
                out.append(comp(select=sel, quant=q))
    return out


def candidate_grid(context: int, options: dict[str, Any]) -> list[Strategy]:
    """``options["candidates"]`` (spec dicts, or ``"library"`` for every default instance) or
    :func:`planner_grid`."""
    chosen = options.get("candidates")
    chosen = None if chosen == "planner" else chosen
    if chosen == "library":
        return [Full(), *default_instances(context)]
    if chosen:
        return [from_spec(s) for s in chosen]
    return planner_grid(context)


@contract(provides=("candidates",))
def assign_candidates(program: Program, ctx: PassContext) -> Program:
    """Put ``facts["candidates"] = {"context", "specs", "per_layer"}`` when a budget is set.

    Guarantees: specs are unique (canonical JSON); ``per_layer[l]`` lists the indices valid for layer
    ``l`` (``validate_for(head_dim, context)`` passes and the target stores the format); every layer
    keeps at least ``full`` (the model-dtype cache), so the problem is never empty; with ``options["engine"]``
    the grid is that engine's per-layer settings only (``kvcompile.engines.<name>.candidates``).
    """
    if not needs_solve(ctx.config):
        return program
    context = int(ctx.config.context)
    grid: list[Strategy] = []
    seen: set[str] = set()
    engine = ctx.options.get("engine")  # a serving engine's own settings only (kvcompile/engines)
    source = _engine_grid(engine, context, ctx.target, ctx.config.kv_budget) if engine else candidate_grid(
        context, {"candidates": ctx.opt("candidates")})
    for s in source:
        key = json.dumps(s.to_spec(), sort_keys=True)
        if key not in seen and target_allows(s, ctx.target):
            seen.add(key)
            grid.append(s)
    if not engine and not any(isinstance(s, Full) and s.dtype == "model" for s in grid):
        grid.insert(0, Full())
    per_layer = []
    for site in program.sites:
        ok = []
        for i, s in enumerate(grid):
            try:
                s.validate_for(head_dim=site.head_dim, context=context)
            except ValueError:
                continue
            ok.append(i)
        per_layer.append(ok)
    fact = Candidates(context=context, specs=[s.to_spec() for s in grid], per_layer=per_layer)
    return program.with_facts(candidates=fact)


def _engine_grid(name: str, context: int, target: Target, kv_budget: float | None) -> list[Strategy]:
    from ..engines import get

    return list(get(name).candidates(context, target, kv_budget=kv_budget))
