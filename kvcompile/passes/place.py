"""The ``place_kv`` pass: tensor-parallel degree, KV placement (GPU / host memory) and batch.

Assumes an assignment (one strategy spec per KV head, from the planner or ``assign_full``). Acts only
when the target has more than one GPU or the objective is one of ``max-throughput``, ``min-latency``,
``min-memory``; otherwise returns the program unchanged. With several GPUs and the default
``min-damage`` objective it solves for ``max-throughput``, and a configuration that does not fit is
reported in ``facts["placement"]["error"]`` and the notes instead of failing the compile.

Guarantees ``facts["placement"]`` (copied into ``Plan.placement``): ``tp``, ``batch``,
``tokens_per_s``, ``step_time_s``, ``per_gpu`` bytes (weights / kv / activations / reserve / free /
capacity), ``placement`` per layer group, ``rank_heads``, ``kv_copies``, ``binding`` (why),
``candidates`` (every TP degree tried) and the problem's provenance (``context``, ``objective``,
``target``, ``model_notes``, ``assumptions``).

The strategies are fixed here (the planner chose them under its quality budget); this pass decides
where their bytes live. The solver is :mod:`kvcompile.solve.parallel` (cost model in its docstring).
"""

from __future__ import annotations

import json
from typing import Any

from ..ir import Program, dtype_bytes
from ..solve.parallel import OBJECTIVES, ParallelInfeasible, ParallelProblem, ParallelSolution, solve_parallel
from ..strategies import from_spec
from ..targets import Target
from .context import ASSIGNMENT, PassContext, contract


def intermediate_size(program: Program, model: Any = None) -> tuple[int, str]:
    """The MLP width from the model config, else the Llama-style estimate from the parameter count.

    With ``P`` params, ``L`` layers, hidden ``d``, vocab ``V``: ``P ~ 2Vd + L(2d*d_attn + 3d*f)``; the
    attention projections are counted as ``2 d^2`` (GQA makes k/v small). Returns (f, source).
    """
    cfg = getattr(model, "config", None)
    f = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
    if f:
        return int(f), "config"
    m = program.model
    per_layer = (m.num_params - 2 * m.vocab_size * m.hidden_size) / max(m.num_layers, 1)
    est = max(int((per_layer - 2 * m.hidden_size**2) / (3 * m.hidden_size)), m.hidden_size)
    return est, "estimated from num_params"


def problem_for(
    program: Program,
    target: Target,
    *,
    context: int,
    batch: int = 1,
    objective: str = "max-throughput",
    assignment: Any = None,
    model: Any = None,
    **options: Any,
) -> ParallelProblem:
    """The :class:`ParallelProblem` of ``program`` (or of ``assignment``, e.g. a uniform baseline).

    Bytes per KV head are the strategies' exact ``bytes_for(context)`` per sequence; KV heads of a
    layer with the same spec form one placement group (as the runtime groups them into one store).
    ``options`` go to the problem (``max_batch``, ``allow_host``, ``tp_degrees``, ...).
    """
    rows = assignment if assignment is not None else program.assignment
    if rows is None:
        raise ValueError("assignment: the program has no strategy assignment yet (run the planner first)")
    kv, rd, groups = [], [], []
    for site, specs in zip(program.sites, rows, strict=True):
        db = dtype_bytes(site.dtype)
        strategies = [from_spec(s) for s in specs]
        kv.append(tuple(s.bytes_for(context, site.head_dim, db) for s in strategies))
        rd.append(tuple(s.reads_bytes_for(context, site.head_dim, db) for s in strategies))
        groups.append(tuple(json.dumps(dict(s), sort_keys=True) for s in specs))
    s0, m = program.sites[0], program.model
    ffn, _ = intermediate_size(program, model)
    return ParallelProblem(
        kv_bytes=tuple(kv),
        kv_read_bytes=tuple(rd),
        groups=tuple(groups),
        num_q_heads=s0.num_q_heads,
        head_dim=s0.head_dim,
        hidden_size=m.hidden_size,
        intermediate_size=ffn,
        vocab_size=m.vocab_size,
        num_params=m.num_params,
        param_bytes=m.param_bytes,
        act_bytes=dtype_bytes(m.dtype),
        context=context,
        gpus=target.gpus,
        memory_bytes=target.memory_bytes,
        memory_bandwidth=target.memory_bandwidth,
        flops=target.peak_flops(m.dtype),
        host_link_bandwidth=target.host_link_bandwidth,
        interconnect_bandwidth=target.interconnect_bandwidth or target.host_link_bandwidth,
        interconnect_latency_s=target.interconnect_latency_s,
        objective=objective,
        batch=batch,
        **options,
    )


def placement_facts(
    sol: ParallelSolution, problem: ParallelProblem, target: Target, notes: list[str]
) -> dict[str, Any]:
    """The JSON form stored in ``facts["placement"]`` / ``Plan.placement``."""
    facts = sol.to_facts()
    facts.update(context=problem.context, target=target.spec, gpus=target.gpus, model_notes=notes)
    facts["assumptions"] = {
        "host_memory_bytes_per_gpu": problem.host_memory_bytes,
        "reserve_fraction": problem.reserve_fraction,
        "prefill_chunk": problem.prefill_chunk,
        "max_batch": problem.max_batch,
        "intermediate_size": problem.intermediate_size,
    }
    return facts


@contract(requires=(ASSIGNMENT,), provides=("placement", "notes"))
def place_kv(program: Program, ctx: PassContext) -> Program:
    """Solve TP degree x placement x batch for the assigned strategies; see the module docstring."""
    objective = getattr(ctx.config, "objective", "min-damage")
    if ctx.target.gpus <= 1 and objective not in OBJECTIVES:
        return program
    if program.assignment is None:
        raise ValueError("place_kv needs a strategy assignment (run assign_full or the planner first)")
    asked = objective in OBJECTIVES
    objective = objective if asked else "max-throughput"
    _, ffn_source = intermediate_size(program, ctx.model)
    keys = ("max_batch", "allow_host", "host_memory_bytes")
    options = {k: ctx.opt(k) for k in keys if ctx.opt(k) is not None}
    problem = problem_for(
        program, ctx.target, context=ctx.config.context, batch=ctx.config.batch, objective=objective,
        model=ctx.model, **options,
    )  # fmt: skip
    try:
        sol = solve_parallel(problem)
    except ParallelInfeasible as e:
        if asked:
            raise
        # placement was not requested (min-damage on a multi-GPU target): report, do not fail the compile
        note = f"place_kv: {e}"
        return program.with_facts(placement={"error": str(e)}, notes=[*program.facts.get("notes", ()), note])
    notes = [f"MLP width {problem.intermediate_size} ({ffn_source})"]
    return program.with_facts(placement=placement_facts(sol, problem, ctx.target, notes))
