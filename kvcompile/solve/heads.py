"""Per-(layer, KV head) strategy selection as a multiple-choice knapsack, solved exactly with CP-SAT.

The model (one Boolean ``x[l, h, c]`` per candidate ``c`` of KV head ``h`` in layer ``l``):

* exactly one candidate per (layer, head):           ``sum_c x[l, h, c] == 1``
* total KV bytes within the budget:                  ``sum bytes[l,h,c] * x[l,h,c] <= budget_bytes``
* optional decode-latency bound:                     ``sum latency[l,h,c] * x[l,h,c] <= latency_budget``
* optional cap on distinct kernel variants per layer: ``x[l,h,c] <= used[l, kernel(c)]``,
  ``sum_k used[l, k] <= max_kernels_per_layer``
* objective: minimise ``sum weight * damage[l,h,c] * x[l,h,c]`` (damage scaled to integers).

Everything here is plain data (ints, floats, strings): the solver never sees torch, and the same input
gives the same solution (fixed ``random_seed``, ``num_workers``, time limit). Only ``kvcompile.solve``
imports ortools.

Example
-------
>>> opts = ((Option("full", 100, 0.0), Option("int4", 30, 0.2)),)
>>> sol = solve_heads(HeadProblem(options=(opts,), budget_bytes=50))
>>> sol.choice, sol.status
(((1,),), 'OPTIMAL')
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import reduce

from ortools.sat.python import cp_model

DAMAGE_RESOLUTION = 1_000_000  # the largest damage maps to this many integer units


class InfeasibleBudget(ValueError):
    """No assignment satisfies the budget (the message names the smallest feasible budget)."""


@dataclass(frozen=True, slots=True)
class Option:
    """One candidate strategy for one KV head.

    ``bytes``: exact KV bytes the head holds at the plan's context (per sequence, or per batch: any unit,
    as long as ``HeadProblem.budget_bytes`` uses the same). ``damage``: non-negative predicted loss
    (already weighted by the layer's sensitivity). ``latency``: integer cost units (e.g. picoseconds of
    decode-step time) used only when a latency budget is set. ``kernel``: kernel-variant id.
    """

    label: str
    bytes: int
    damage: float
    latency: int = 0
    kernel: str = ""


@dataclass(frozen=True, slots=True)
class HeadProblem:
    """``options[layer][head]`` lists the candidates of that KV head (at least one each)."""

    options: tuple[tuple[tuple[Option, ...], ...], ...]
    budget_bytes: int
    latency_budget: int | None = None
    max_kernels_per_layer: int | None = None
    time_limit_s: float = 20.0
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError("options: need at least one layer")
        for l_, heads in enumerate(self.options):
            if not heads:
                raise ValueError(f"options[{l_}]: layer has no KV heads")
            for h, opts in enumerate(heads):
                if not opts:
                    raise ValueError(f"options[{l_}][{h}]: no candidate strategies")
                for o in opts:
                    if o.bytes < 0 or o.latency < 0:
                        raise ValueError(f"options[{l_}][{h}] {o.label!r}: bytes and latency must be >= 0")
                    if not (o.damage >= 0 and math.isfinite(o.damage)):
                        raise ValueError(f"options[{l_}][{h}] {o.label!r}: damage must be finite and >= 0")
        if self.budget_bytes < 0:
            raise ValueError(f"budget_bytes={self.budget_bytes} must be >= 0")
        if self.max_kernels_per_layer is not None and self.max_kernels_per_layer < 1:
            raise ValueError(f"max_kernels_per_layer={self.max_kernels_per_layer} must be >= 1")
        if self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s={self.time_limit_s} must be > 0")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")

    def min_bytes(self) -> int:
        """The smallest achievable total bytes (every head at its smallest candidate)."""
        return sum(min(o.bytes for o in opts) for heads in self.options for opts in heads)

    def max_bytes(self) -> int:
        return sum(max(o.bytes for o in opts) for heads in self.options for opts in heads)


@dataclass(frozen=True, slots=True)
class HeadSolution:
    """``choice[layer][head]`` is the index of the chosen option. ``gap`` is relative:
    ``(objective - bound) / max(objective, tiny)``, 0 when proven optimal."""

    choice: tuple[tuple[int, ...], ...]
    status: str
    objective: float
    bound: float
    gap: float
    total_bytes: int
    total_latency: int
    wall_s: float
    num_vars: int
    notes: tuple[str, ...] = field(default=())

    def chosen(self, problem: HeadProblem) -> list[list[Option]]:
        return [
            [problem.options[l_][h][c] for h, c in enumerate(row)] for l_, row in enumerate(self.choice)
        ]


def _damage_scale(problem: HeadProblem) -> float:
    top = max((o.damage for heads in problem.options for opts in heads for o in opts), default=0.0)
    return DAMAGE_RESOLUTION / top if top > 0 else 1.0


def pareto(opts: tuple[Option, ...], *, use_latency: bool, use_kernel: bool) -> list[int]:
    """Indices of the options no other option beats on bytes and damage (and latency / kernel when those
    are constrained); among exact ties the first index is kept. Removing the others is exact."""
    def key(o: Option) -> tuple:
        return (o.bytes, o.damage, o.latency if use_latency else 0)

    out = []
    for i, a in enumerate(opts):
        ka = key(a)
        dominated = False
        for j, b in enumerate(opts):
            if j == i or (use_kernel and a.kernel != b.kernel):
                continue
            kb = key(b)
            if all(x <= y for x, y in zip(kb, ka, strict=True)) and (kb != ka or j < i):
                dominated = True
                break
        if not dominated:
            out.append(i)
    return out


def solve_heads(problem: HeadProblem) -> HeadSolution:
    """Solve the per-head selection exactly (up to the time limit); raise :class:`InfeasibleBudget`."""
    t0 = time.perf_counter()
    min_b = problem.min_bytes()
    if min_b > problem.budget_bytes:
        raise InfeasibleBudget(
            f"KV budget {problem.budget_bytes} bytes is infeasible: the smallest candidate of every head "
            f"still needs {min_b} bytes (smallest feasible budget = {min_b} bytes, "
            f"{min_b / max(problem.max_bytes(), 1):.4f} of the largest assignment)"
        )
    # integer bytes: divide by the gcd of every coefficient; floor(budget / g) keeps the constraint exact
    g = reduce(math.gcd, (o.bytes for heads in problem.options for opts in heads for o in opts), 0) or 1
    scale = _damage_scale(problem)
    capped = problem.max_kernels_per_layer is not None

    # Exact reductions: drop options dominated on every constrained quantity, then merge heads whose
    # remaining options are identical into one class with an integer count per option (heads of a layer
    # calibrated by priors, or GQA copies, are interchangeable: this removes the symmetry).
    classes: dict[tuple, list[tuple[int, int]]] = {}
    kept: dict[tuple, list[int]] = {}
    for l_, heads in enumerate(problem.options):
        for h, opts in enumerate(heads):
            idx = pareto(opts, use_latency=problem.latency_budget is not None, use_kernel=capped)
            sig = tuple((opts[i].bytes, opts[i].damage, opts[i].latency, opts[i].kernel) for i in idx)
            key = (l_ if capped else -1, sig)
            classes.setdefault(key, []).append((l_, h))
            kept.setdefault(key, idx)

    m = cp_model.CpModel()
    counts: dict[tuple, list[cp_model.IntVar]] = {}
    byte_terms, lat_terms, obj_terms = [], [], []
    used: dict[tuple[int, str], cp_model.IntVar] = {}
    for n_cls, (key, members) in enumerate(classes.items()):
        size = len(members)
        l0, h0 = members[0]
        cls_opts = [problem.options[l0][h0][i] for i in kept[key]]
        cv = [m.new_int_var(0, size, f"n_{n_cls}_{j}") for j in range(len(cls_opts))]
        m.add(sum(cv) == size)
        for v, o in zip(cv, cls_opts, strict=True):
            byte_terms.append(v * (o.bytes // g))
            lat_terms.append(v * o.latency)
            d = round(o.damage * scale)
            if d:
                obj_terms.append(v * d)
            if capped:
                u = used.setdefault((l0, o.kernel), m.new_bool_var(f"k_{l0}_{o.kernel}"))
                m.add(v <= size * u)
        counts[key] = cv
    if problem.max_kernels_per_layer is not None:
        for l_ in range(len(problem.options)):
            layer_used = [u for (ll, _), u in used.items() if ll == l_]
            if len(layer_used) > problem.max_kernels_per_layer:
                m.add(sum(layer_used) <= problem.max_kernels_per_layer)
    m.add(sum(byte_terms) <= problem.budget_bytes // g)
    if problem.latency_budget is not None:
        m.add(sum(lat_terms) <= problem.latency_budget)
    m.minimize(sum(obj_terms) if obj_terms else 0)

    solver = cp_model.CpSolver()
    solver.parameters.random_seed = problem.seed
    solver.parameters.num_workers = problem.workers
    solver.parameters.max_time_in_seconds = problem.time_limit_s
    status = solver.solve(m)
    name = solver.status_name(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        why = []
        if problem.latency_budget is not None:
            min_lat = sum(min(o.latency for o in opts) for heads in problem.options for opts in heads)
            why.append(f"latency budget {problem.latency_budget} (smallest achievable alone: {min_lat})")
        if problem.max_kernels_per_layer is not None:
            why.append(f"max_kernels_per_layer={problem.max_kernels_per_layer}")
        detail = "; ".join(why) or f"solver status {name}"
        raise InfeasibleBudget(
            f"no plan satisfies the constraints together ({detail}); KV bytes alone need >= {min_b} bytes, "
            f"budget is {problem.budget_bytes} (solver status {name} after {solver.wall_time:.1f}s)"
        )
    grid = [[0] * len(heads) for heads in problem.options]
    for key, members in classes.items():
        picks = [j for j, v in zip(kept[key], counts[key], strict=True) for _ in range(solver.value(v))]
        for (l_, h), j in zip(members, picks, strict=True):
            grid[l_][h] = j
    choice = tuple(tuple(row) for row in grid)
    chosen = [problem.options[l_][h][c] for l_, row in enumerate(choice) for h, c in enumerate(row)]
    objective = sum(o.damage for o in chosen)
    bound = solver.best_objective_bound / scale if obj_terms else 0.0
    if status == cp_model.OPTIMAL:
        bound = objective
    gap = 0.0 if status == cp_model.OPTIMAL else max(0.0, objective - bound) / max(objective, 1e-12)
    return HeadSolution(
        choice=choice,
        status=name,
        objective=objective,
        bound=bound,
        gap=gap,
        total_bytes=sum(o.bytes for o in chosen),
        total_latency=sum(o.latency for o in chosen),
        wall_s=time.perf_counter() - t0,
        num_vars=len(byte_terms),
        notes=(f"{len(classes)} head classes after merging identical heads",),
    )
