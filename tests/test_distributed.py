"""Tensor-parallel execution of a mixed plan (torchrun, gloo, CPU) against the single-process run.

The reference is the same plan run in one process with ``plan.make_cache(model)``; the distributed
run uses transformers' ``tp_plan="auto"`` sharding and one KV head per rank (SmolLM2: 3 KV heads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcompile._compat import cache_kw
from kvcompile.runtime import make_cache, mixed_plan
from kvcompile.runtime.distributed import TieredCache, make_rank_cache, rank_heads, shard_plan
from kvcompile.solve.parallel import rank_heads as solver_rank_heads

ROOT = Path(__file__).resolve().parent.parent
MIXED = [{"name": "full"}, {"name": "quant", "bits": 8}, {"name": "quant", "bits": 4}]
# host tier: layer 1 all heads, layer 4 only KV head 0 (full), layer 7 only KV head 2 (KIVI 4-bit)
HOST = {1: [0, 1, 2], 4: [0], 7: [2]}


def with_placement(plan, host: dict[int, list[int]]):
    """The plan with a ``placement`` that puts the given (layer, KV heads) in host memory."""
    rows = []
    for lp in plan.layers:
        hs = host.get(lp.layer, [])
        groups = [{"group": "host", "heads": hs, "where": "host"}] if hs else []
        rest = [h for h in range(len(lp.heads)) if h not in hs]
        groups += [{"group": "hbm", "heads": rest, "where": "hbm"}] if rest else []
        rows.append({"layer": lp.layer, "groups": groups})
    return plan.model_copy(update={"placement": {"placement": rows}}).sealed()


def prompt_ids(tok) -> torch.Tensor:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from torchrun_smollm2 import PROMPT
    finally:
        sys.path.pop(0)
    return tok(PROMPT, return_tensors="pt").input_ids


def generate(model, tok, cache, ids, n=8) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kw(cache),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def test_rank_heads_match_the_solver_and_shards_add_up(smol):
    for h, t in [(3, 1), (3, 3), (8, 2), (8, 4), (8, 8)]:
        assert rank_heads(h, t) == solver_rank_heads(h, t)
    with pytest.raises(ValueError, match="world=2"):
        rank_heads(3, 2)
    plan = mixed_plan(smol.model, MIXED, context=512)
    for n in (1, 100, 333):
        shares = [shard_plan(plan, r, 3).predicted_kv_bytes(n) for r in range(3)]
        assert sum(shares) == plan.predicted_kv_bytes(n)
    assert len(set(shares)) == 3  # at 333 tokens KIVI has quantized: three formats, three shares


@pytest.mark.slow
def test_host_tier_moves_exact_bytes_and_keeps_tokens(smol):
    model, tok = smol.model, smol.tokenizer
    plan = with_placement(mixed_plan(model, MIXED, context=512), HOST)
    ids = prompt_ids(tok)
    try:
        ref_cache = make_cache(plan, model)
        ref = generate(model, tok, ref_cache, ids)
        cache = make_rank_cache(plan, model, rank=0, world=1)
        assert isinstance(cache, TieredCache)
        got = generate(model, tok, cache, ids)
    finally:
        model.set_attn_implementation("sdpa")
    assert got == ref
    assert cache.nbytes() == ref_cache.nbytes()
    # every forward fetches the host stores as they were before it: 0 tokens, then P, P+1, ...
    P, steps = ids.shape[1], 8
    before = [0, *range(P, P + steps - 1)]
    strategies = plan.strategies()
    want = sum(strategies[la][h].bytes_for(n, 64, 4) for la, hs in HOST.items() for h in hs for n in before)
    assert cache.bytes_moved()["to_device"] == want
    host_now = sum(strategies[la][h].bytes_for(P + steps - 1, 64, 4) for la, hs in HOST.items() for h in hs)
    assert cache.host_nbytes() == host_now
    assert 0 < cache.bytes_moved()["to_host"] <= cache.bytes_moved()["to_device"] + host_now


@pytest.mark.slow
def test_torchrun_three_ranks_match_single_process(smol, tmp_path):
    model, tok = smol.model, smol.tokenizer
    plan = with_placement(mixed_plan(model, MIXED, context=512), HOST)
    plan_path = plan.save(tmp_path / "mixed.kvplan")
    ids = prompt_ids(tok)
    try:
        ref_cache = make_cache(plan, model)
        ref = generate(model, tok, ref_cache, ids)
    finally:
        model.set_attn_implementation("sdpa")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
           str(ROOT / "examples" / "torchrun_smollm2.py"), "--plan", str(plan_path),
           "--model-dir", model.config._name_or_path, "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(3)]
    for r, rep in enumerate(reports):
        assert rep["tokens"][0] == ref, (r, rep["tokens"], ref)
        assert rep["kv_heads"] == [r]
        assert rep["cache_nbytes"] == rep["predicted_nbytes"] > 0  # each rank holds exactly its share
        assert rep["cache_nbytes"] == shard_plan(plan, r, 3).predicted_kv_bytes(rep["seq_length"])
    assert sum(rep["cache_nbytes"] for rep in reports) == ref_cache.nbytes()
    assert len({rep["cache_nbytes"] for rep in reports}) == 3  # full > 8-bit > 4-bit
    # host tier on ranks: rank 0 has layers 1 and 4, rank 1 layer 1, rank 2 layers 1 and 7
    assert all(rep["bytes_moved"]["to_device"] > 0 for rep in reports)


@pytest.mark.gpu
def test_host_tier_on_cuda_keeps_host_groups_in_cpu_memory():
    from kvcompile.models import load

    loaded = load("smollm2-135m")
    model, tok = loaded.model.to("cuda"), loaded.tokenizer
    plan = with_placement(mixed_plan(model, MIXED, context=512), HOST)
    ids = prompt_ids(tok).to("cuda")
    ref = generate(model, tok, make_cache(plan, model), ids)
    cache = make_rank_cache(plan, model, rank=0, world=1, host_device="cpu")
    assert generate(model, tok, cache, ids) == ref
    cache.evict_staged()
    for la, layer in enumerate(cache.layers):
        for i, store in enumerate(layer.stores):
            want = "cpu" if la in HOST and i in getattr(layer, "host_groups", ()) else "cuda"
            assert {t.device.type for t in store.tensors().values()} == {want}, (la, i)
    assert cache.bytes_moved()["to_device"] > 0
