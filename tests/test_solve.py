"""CP-SAT head selection vs brute force on toy instances, infeasibility, determinism."""

from __future__ import annotations

import itertools
import random

import pytest

from kvcompile.solve import HeadProblem, InfeasibleBudget, Option, solve_heads


def _random_problem(seed: int, layers: int = 2, heads: int = 2, cands: int = 3, **kw) -> HeadProblem:
    rng = random.Random(seed)
    opts = tuple(
        tuple(
            tuple(
                Option(f"s{c}", rng.randrange(1, 40) * 8, float(rng.randrange(0, 1000)), rng.randrange(0, 50),
                       f"k{rng.randrange(3)}")
                for c in range(cands)
            )
            for _ in range(heads)
        )
        for _ in range(layers)
    )
    total_max = sum(max(o.bytes for o in h) for layer in opts for h in layer)
    total_min = sum(min(o.bytes for o in h) for layer in opts for h in layer)
    budget = (total_min + total_max) // 2
    return HeadProblem(options=opts, budget_bytes=budget, **kw)


def _brute_force(p: HeadProblem) -> float | None:
    flat = [opts for heads in p.options for opts in heads]
    best = None
    for combo in itertools.product(*[range(len(o)) for o in flat]):
        chosen = [flat[i][c] for i, c in enumerate(combo)]
        if sum(o.bytes for o in chosen) > p.budget_bytes:
            continue
        if p.latency_budget is not None and sum(o.latency for o in chosen) > p.latency_budget:
            continue
        if p.max_kernels_per_layer is not None:
            i, ok = 0, True
            for heads in p.options:
                ks = {chosen[i + h].kernel for h in range(len(heads))}
                ok &= len(ks) <= p.max_kernels_per_layer
                i += len(heads)
            if not ok:
                continue
        d = sum(o.damage for o in chosen)
        best = d if best is None or d < best else best
    return best


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed):
    p = _random_problem(seed)
    sol = solve_heads(p)
    assert sol.status == "OPTIMAL" and sol.gap == 0.0
    assert sol.objective == pytest.approx(_brute_force(p), abs=1e-9)
    assert sol.total_bytes <= p.budget_bytes
    chosen = sol.chosen(p)
    assert sol.total_bytes == sum(o.bytes for row in chosen for o in row)


@pytest.mark.parametrize("seed", range(6))
def test_latency_and_kernel_cap_match_brute_force(seed):
    base = _random_problem(100 + seed, layers=2, heads=3, cands=3)
    min_lat = sum(min(o.latency for o in h) for layer in base.options for h in layer)
    max_lat = sum(max(o.latency for o in h) for layer in base.options for h in layer)
    p = HeadProblem(
        options=base.options, budget_bytes=base.budget_bytes, latency_budget=(min_lat + max_lat) // 2,
        max_kernels_per_layer=1 + seed % 2,
    )
    ref = _brute_force(p)
    if ref is None:
        with pytest.raises(InfeasibleBudget):
            solve_heads(p)
        return
    sol = solve_heads(p)
    assert sol.objective == pytest.approx(ref, abs=1e-9)
    assert sol.total_latency <= p.latency_budget
    for layer in sol.chosen(p):
        assert len({o.kernel for o in layer}) <= p.max_kernels_per_layer


def test_budget_binds_and_prefers_cheap_damage():
    # two heads; only one can stay full within the budget: the head whose compression hurts more stays full
    opts = (
        (
            (Option("full", 100, 0.0), Option("q4", 30, 5.0)),
            (Option("full", 100, 0.0), Option("q4", 30, 1.0)),
        ),
    )
    sol = solve_heads(HeadProblem(options=opts, budget_bytes=130))
    assert sol.choice == ((0, 1),)
    assert sol.total_bytes == 130 and sol.objective == 1.0


def test_infeasible_budget_names_smallest_feasible():
    p = _random_problem(3)
    smallest = p.min_bytes()
    bad = HeadProblem(options=p.options, budget_bytes=smallest - 1)
    with pytest.raises(InfeasibleBudget, match=f"smallest feasible budget = {smallest} bytes"):
        solve_heads(bad)
    assert solve_heads(HeadProblem(options=p.options, budget_bytes=smallest)).total_bytes == smallest


def test_infeasible_latency_is_explained():
    opts = (((Option("a", 10, 0.0, latency=5), Option("b", 20, 1.0, latency=9)),),)
    with pytest.raises(InfeasibleBudget, match="latency budget 4"):
        solve_heads(HeadProblem(options=opts, budget_bytes=100, latency_budget=4))


def test_deterministic():
    p = _random_problem(7, layers=6, heads=3, cands=8)
    a, b = solve_heads(p), solve_heads(p)
    assert a.choice == b.choice and a.objective == b.objective


@pytest.mark.parametrize(
    "kw, param",
    [({"budget_bytes": -1}, "budget_bytes"), ({"max_kernels_per_layer": 0}, "max_kernels_per_layer"),
     ({"time_limit_s": 0}, "time_limit_s")],
)
def test_bad_input_names_parameter(kw, param):
    opts = (((Option("a", 1, 0.0),),),)
    with pytest.raises(ValueError, match=param):
        HeadProblem(options=opts, **{"budget_bytes": 1, **kw})
    with pytest.raises(ValueError, match="damage"):
        HeadProblem(options=(((Option("a", 1, -1.0),),),), budget_bytes=1)
    with pytest.raises(ValueError, match="no candidate"):
        HeadProblem(options=(((),),), budget_bytes=1)
