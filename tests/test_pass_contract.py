"""Typed pass contract: facts are typed records checked by ir.verify; the runner refuses mis-ordered
pipelines and undeclared writes."""

from __future__ import annotations

import dataclasses

import pytest
from test_planner import _program

from kvcompile.ir import Candidates, Damage, IRError, verify
from kvcompile.passes import PIPELINE, PassContext, PassError, contract, contract_of, run_pipeline
from kvcompile.plan import PlanConfig
from kvcompile.targets import load_target


def _ctx(**cfg):
    return PassContext(target=load_target("h100"), config=PlanConfig(**cfg), progress=False)


def test_swapping_calibrate_and_candidates_is_refused_before_running():
    ran = []
    order = dict(PIPELINE)
    names = [n for n, _ in PIPELINE]
    i, j = names.index("assign_candidates"), names.index("calibrate")
    names[i], names[j] = names[j], names[i]

    def spy(name):
        fn = order[name]

        def wrapped(p, c):
            ran.append(name)
            return fn(p, c)
        wrapped.contract = contract_of(name, fn)  # type: ignore[attr-defined]
        return wrapped

    want = r"out of order: pass 'calibrate'.*'candidates' \(provided by 'assign_candidates'\)"
    with pytest.raises(PassError, match=want):
        run_pipeline(_program(), _ctx(context=1024, kv_budget=0.25), [(n, spy(n)) for n in names])
    assert ran == []  # refused up front, not after a silent full plan


def test_the_shipped_pipeline_with_a_budget_still_solves():
    prog = run_pipeline(_program(), _ctx(context=1024, kv_budget=0.25))
    assert isinstance(prog.facts["candidates"], Candidates) and isinstance(prog.facts["damage"], Damage)
    assert prog.facts["solve"]["status"] == "OPTIMAL" and prog.facts["solve"].kv_ratio_vs_full_bf16 <= 0.25


def test_undeclared_write_is_refused():
    @contract(provides=("notes",))
    def sneaky(program, ctx):
        return program.with_facts(notes=["x"], predicted={"decode_step_s": 1.0})

    with pytest.raises(PassError, match=r"sneaky.*does not declare: \['predicted'\]"):
        run_pipeline(_program(), _ctx(context=1024), [("sneaky", sneaky)])


def test_verify_checks_fact_keys_types_and_shapes():
    prog = _program(layers=2, hk=2)
    with pytest.raises(IRError, match="unknown fact 'damages'"):
        verify(prog.with_facts(damages={}))
    with pytest.raises(IRError, match="fact 'candidates' must be Candidates"):
        verify(prog.with_facts(candidates={"context": 1, "specs": [], "per_layer": []}))
    specs = [{"name": "full"}, {"name": "quant", "bits": 4}]
    cands = Candidates(context=1024, specs=specs, per_layer=[[0, 1], [0, 1]])
    verify(prog.with_facts(candidates=cands))
    with pytest.raises(IRError, match="per_layer"):
        verify(prog.with_facts(candidates=dataclasses.replace(cands, per_layer=[[0, 2], [0]])))
    ok = Damage(source="priors", values=[[[0.0, 1.0]] * 2] * 2, layer_weight=[1.0, 1.0])
    verify(prog.with_facts(candidates=cands, damage=ok))
    with pytest.raises(IRError, match="one value per candidate"):
        verify(prog.with_facts(candidates=cands, damage=dataclasses.replace(ok, values=[[[0.0]] * 2] * 2)))
    with pytest.raises(IRError, match="kv head"):
        verify(prog.with_facts(damage=dataclasses.replace(ok, values=[[[0.0, 1.0]]] * 2)))
    with pytest.raises(IRError, match="source"):
        verify(prog.with_facts(damage=dataclasses.replace(ok, source="guess")))
    assert dict(ok.items())["source"] == "priors" and ok["layer_weight"] == [1.0, 1.0]


def test_plan_changing_options_are_typed_hashed_config_fields():
    from kvcompile.api import optimize

    kw = dict(context=2048, kv_budget=0.25, progress=False)
    a = optimize("llama-3-8b", **kw)
    b = optimize("llama-3-8b", **kw, max_kernels_per_layer=1, solver_seed=3)
    assert a.config.planner.max_kernels_per_layer is None and b.config.planner.max_kernels_per_layer == 1
    assert b.config.planner.solver_seed == 3 and a.content_hash != b.content_hash
    assert '"max_kernels_per_layer": 1' in b.to_json()
    with pytest.raises(ValueError, match=r"verify_tokens=5"):
        optimize("llama-3-8b", **kw, verify_tokens=5)
