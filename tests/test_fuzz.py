"""The project's plan fuzzer (benchmarks/fuzz.py) in CI: >= 2,000 mutated real plans, including
hash-recomputed ones, give 0 exceptions other than PlanError, 0 inconsistent plans accepted, 0 hangs,
and an injected kernel source never runs. Bases: SmolLM2-135M at 25 % (real weights; make_cache and
a prefill + decode step on the real model) and Llama-3-70B on 8 x H100 from its config (meta)."""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz.py"


def _module():
    spec = importlib.util.spec_from_file_location("kvcompile_bench_fuzz", FUZZ)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def fuzz_mod():
    return _module()


@pytest.fixture(scope="session")
def bases(smol, fuzz_mod):
    plan_s = fuzz_mod.build_smol_plan(smol)
    plan_70, meta70 = fuzz_mod.build_70b_plan()
    texts = {"smollm2-25pct": plan_s.to_json(), "llama-3-70b-8xh100": plan_70.to_json()}
    models = {"smollm2-25pct": (smol.model, True), "llama-3-70b-8xh100": (meta70, False)}
    return texts, models


@pytest.mark.slow
def test_fuzz_2000_variants(fuzz_mod, bases, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    texts, models = bases
    t0 = time.perf_counter()
    summary = fuzz_mod.fuzz(texts, models, n=2000, seed=12345)
    wall = time.perf_counter() - t0
    out = summary["outcomes"]
    assert sum(out.values()) == 2000
    assert out["bug"] == 0 and out["accepted_inconsistent"] == 0 and out["hang"] == 0, summary["examples"]
    # the fuzzer reaches deep: every kind ran, and some rehashed edits were accepted as valid plans
    assert all(sum(c.values()) == 400 for c in summary["by_kind"].values())
    assert summary["by_kind"]["json_rehash"]["accepted_consistent"] > 0
    assert wall < 180, f"fuzzing took {wall:.0f} s"


def test_mutations_are_seeded_and_recomputed_hashes_are_valid(fuzz_mod, bases):
    texts, _ = bases
    text = texts["smollm2-25pct"]
    raw = json.loads(text)
    a = [fuzz_mod.mutate(random.Random(7), k, text, raw, "/m") for k in fuzz_mod.KINDS]
    b = [fuzz_mod.mutate(random.Random(7), k, text, raw, "/m") for k in fuzz_mod.KINDS]
    assert a == b and all(x != text.encode() for x in a)
    from kvcompile.plan import Plan

    assert fuzz_mod.rehash(raw) == raw["content_hash"] == Plan.model_validate(raw).compute_hash()


def test_oracle_catches_an_inconsistent_plan(fuzz_mod, bases):
    """The consistency oracle itself can fail: a plan whose prediction was edited in memory."""
    from kvcompile.plan import Plan

    texts, _ = bases
    plan = Plan.model_validate(json.loads(texts["smollm2-25pct"]))
    fuzz_mod.check_consistent(plan)
    bad = plan.model_copy(update={"predicted": {**plan.predicted, "kv_bytes_at_context": 1}}).sealed()
    with pytest.raises(fuzz_mod.Inconsistent, match="kv_bytes_at_context"):
        fuzz_mod.check_consistent(bad)
