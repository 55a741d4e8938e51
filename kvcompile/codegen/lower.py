"""Lowering: a plan (per-layer, per-KV-head strategies) -> a runtime :class:`Schedule` + kernel sources.

Per layer, KV heads sharing a strategy form head groups (the same grouping as the runtime cache,
``runtime.cache.group_heads``). Groups whose storage format has a kernel (``keys.slot_for``) are
served by one decode launch per layer: a uniform kernel when the layer has one such group, the fused
mixed-format kernel otherwise. H2O groups (which must also return the attention mass they accumulate)
get one ``decode_compact_scored`` launch each; other formats keep their store's torch reference.
See ``codegen/schedule.py`` for the phases.

Example
-------
>>> sched = lower(plan)                         # doctest: +SKIP
>>> plan = with_codegen(plan)  # fills plan.schedule and plan.kernels  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..ir import Program
from ..plan import Plan, PlanError
from ..strategies import Strategy, from_spec
from .cache import KernelSourceError, load_kernel, render, sha256
from .keys import DTYPE_TAGS, KernelKey, append_key, decode_key, scored_key, slot_for
from .schedule import Instr, Schedule, group_heads

SELECTION_FORMATS = ("compact", "compact_scored")


def lower_strategies(
    strategies: Sequence[Sequence[Strategy]], *, head_dim: int, gqa: int, dtype: str = "float32"
) -> Schedule:
    """Schedule for ``strategies[layer][kv_head]`` (see module docstring)."""
    instrs: list[Instr] = []
    keys: dict[str, KernelKey] = {}

    def key(k: KernelKey) -> str:
        keys[k.uri()] = k
        return k.uri()

    for layer, row in enumerate(strategies):
        groups = group_heads(row, gqa)
        maybe = [slot_for(g.strategy, head_dim) for g in groups]
        slots = {i: s for i, s in enumerate(maybe) if s is not None}  # groups served by kernels
        served = tuple(slots)
        main_ops = []  # the appends of prefill and decode
        for gi, g in enumerate(groups):
            fmt = g.strategy.kernel_format()
            if fmt == "quant" and gi in slots:
                main_ops.append(("push_residual", gi))
                s = slots[gi]
                instrs.append(
                    Instr("flush_quant", "flush", layer, gi, key(append_key(s, head_dim, dtype)),
                          (("threshold", s.residual + s.group), ("group", s.group)))
                )  # fmt: skip
            elif fmt in SELECTION_FORMATS:
                instrs.append(Instr("append", "evict", layer, gi))
            else:
                main_ops.append(("append", gi))
        for gi in range(len(groups)):
            instrs.append(Instr("attend_ref", "prefill", layer, gi))
        if served:
            uri = key(decode_key(tuple(slots[i] for i in served), head_dim, gqa, dtype))
            instrs.append(Instr("attend_decode", "decode", layer, -1, uri, (("groups", served),)))
        for gi, g in enumerate(groups):
            if gi in served:
                continue
            if g.strategy.kernel_format() == "compact_scored":  # H2O: attention + per-key mass, own launch
                instrs.append(
                    Instr("attend_scored", "decode", layer, gi, key(scored_key(head_dim, gqa, dtype)))
                )
            else:
                instrs.append(Instr("attend_ref", "decode", layer, gi))
        for phase in ("prefill", "decode"):
            instrs += [Instr(op, phase, layer, gi) for op, gi in main_ops]
    order = {p: i for i, p in enumerate(("prefill", "decode", "flush", "evict"))}
    instrs.sort(key=lambda i: (i.layer, order[i.phase]))  # stable: keeps attend before append
    return Schedule(tuple(instrs), {u: k.to_json() for u, k in sorted(keys.items())})


def lower(plan: Plan) -> Schedule:
    """The schedule of a plan (every layer of a plan shares head_dim and GQA ratio in this runtime)."""
    sites = plan.model.sites
    head_dims = {s.head_dim for s in sites}
    gqas = {s.num_q_heads // s.num_kv_heads for s in sites}
    if len(head_dims) != 1 or len(gqas) != 1:
        raise PlanError(f"lower: layers differ in head_dim {sorted(head_dims)} or GQA ratio {sorted(gqas)}")
    dtype = plan.model.dtype if plan.model.dtype in ("float32", "float16", "bfloat16") else "float32"
    return lower_strategies(plan.strategies(), head_dim=head_dims.pop(), gqa=gqas.pop(), dtype=dtype)


def emit_code(program: Program, ctx: Any = None) -> Program:
    """Pass ``(Program, PassContext) -> Program``: put the runtime schedule and the rendered kernel sources
    in ``program.facts`` (``schedule``, ``kernels``), which ``api.plan_from_program`` stores in the plan.

    Assumes an assignment (one spec per KV head). Models whose layers differ in head_dim or GQA ratio
    get a note instead (the runtime serves them with the torch reference)."""
    if program.assignment is None:
        raise ValueError("emit_code: the program has no strategy assignment")
    shapes = {(s.head_dim, s.gqa_group) for s in program.sites}
    if len(shapes) != 1:
        notes = [
            *program.facts.get("notes", ()),
            f"codegen: layers differ in (head_dim, gqa) {sorted(shapes)}",
        ]
        return program.with_facts(notes=notes)
    (head_dim, gqa), dtype = shapes.pop(), program.sites[0].dtype
    strategies = [[from_spec(spec) for spec in row] for row in program.assignment]
    sched = lower_strategies(
        strategies, head_dim=head_dim, gqa=gqa, dtype=dtype if dtype in DTYPE_TAGS else "float32"
    )
    return program.with_facts(schedule=sched.to_json(), kernels=emit_kernels(sched))


def emit_kernels(plan_or_schedule: Plan | Schedule) -> dict[str, dict[str, Any]]:
    """``uri -> {"source", "sha256", "key"}`` for every kernel the schedule uses (``Plan.kernels``)."""
    sched = lower(plan_or_schedule) if isinstance(plan_or_schedule, Plan) else plan_or_schedule
    out = {}
    for uri, kj in sched.kernels.items():
        src = render(KernelKey.from_json(dict(kj)))
        out[uri] = {"source": src, "sha256": sha256(src), "key": dict(kj)}
    return out


def with_codegen(plan: Plan) -> Plan:
    """A sealed copy of ``plan`` whose ``schedule`` and ``kernels`` fields are filled."""
    sched = lower(plan)
    return plan.model_copy(update={"schedule": sched.to_json(), "kernels": emit_kernels(sched)}).sealed()


def load_plan_kernels(plan: Plan) -> dict[str, tuple[Any, Any]]:
    """The kernels of every record a plan carries, each rendered from its key by this kvcompile; the
    record's source and hash are only compared with that rendering (a plan's text never runs).

    Returns ``uri -> (entry, reduce)`` jit functions. Raises :class:`KernelSourceError` (a PlanError).
    """
    out = {}
    for uri, rec in (plan.kernels or {}).items():
        try:
            k = KernelKey.from_json(dict(rec["key"]))
            src, digest = rec["source"], rec["sha256"]
        except (KeyError, TypeError, ValueError) as e:
            raise KernelSourceError(f"kernel {uri}: malformed record ({e})") from None
        if k.uri() != uri:
            raise KernelSourceError(f"kernel {uri}: its key renders as {k.uri()}")
        out[uri] = load_kernel(k, src, digest)
    return out
