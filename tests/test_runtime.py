"""Runtime cache on tiny random models (fast): GPT-2 (MHA, learned positions) and Llama (GQA 6/3).

References: transformers' own DynamicCache runs of the same model, and ``reference_attention`` on
K/V rounded to each head's storage dtype.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kvcompile._compat import cache_kw
from kvcompile.plan import PlanError
from kvcompile.runtime import (
    KVCompileCache,
    PlanWarning,
    make_cache,
    mixed_plan,
    uniform_plan,
)
from kvcompile.runtime.attention import attend_layer, new_token_validity
from kvcompile.runtime.cache import KVCompileLayer, group_heads, pending
from kvcompile.strategies import REGISTRY, from_spec, reference_attention

VOCAB = 256


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=512, bos_token_id=1, eos_token_id=2
    )
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad rows of token ids with 0; returns (ids, attention_mask)."""
    n = max(map(len, rows))
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _rows(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _generate(model, ids, mask, cache=None, **kw):
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=mask, **cache_kw(cache), pad_token_id=0, **kw)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_full_plan_matches_dynamic_cache_greedy(which, request):
    model = request.getfixturevalue(which)
    plan = uniform_plan(model, "full", context=512)
    ids, mask = _batch(_rows(1, [9, 14, 5]))
    cache = make_cache(plan, model)
    out = _generate(model, ids, mask, cache)
    ref = _generate(model, ids, mask, DynamicCache(config=model.config))
    assert torch.equal(out, ref)
    # make_cache switched the model to "kvcompile": without a KVCompileCache it must behave as sdpa
    assert model.config._attn_implementation == "kvcompile"
    assert torch.equal(_generate(model, ids, mask), ref)
    assert cache.get_seq_length() == ids.shape[1] + 11  # logical tokens seen, padding included
    assert cache.nbytes() == plan.predicted_kv_bytes(cache.get_seq_length(), batch=3)


def test_padded_rows_equal_unpadded_runs(gpt2):
    plan = uniform_plan(gpt2, "full", context=512)
    rows = _rows(2, [6, 13])
    ids, mask = _batch(rows)
    out = _generate(gpt2, ids, mask, make_cache(plan, gpt2), max_new_tokens=10)
    for i, r in enumerate(rows):
        single = _generate(
            gpt2,
            torch.tensor([r]),
            torch.ones(1, len(r), dtype=torch.long),
            make_cache(plan, gpt2),
            max_new_tokens=10,
        )
        assert out[i, ids.shape[1] :].tolist() == single[0, len(r) :].tolist()


def test_mixed_lossless_groups_match_dynamic_cache(llama):
    """Heads {0, 2} and {1} form two groups (non-contiguous): outputs must land in the right heads."""
    plan = mixed_plan(llama, [{"name": "full"}, {"name": "full", "dtype": "float32"}], context=512)
    cache = make_cache(plan, llama)
    assert [g.kv_heads for g in cache.layers[0].groups] == [(0, 2), (1,)]
    assert [g.q_heads for g in cache.layers[0].groups] == [(0, 1, 4, 5), (2, 3)]
    ids, mask = _batch(_rows(3, [11, 7]))
    ref_cache = DynamicCache(config=llama.config)
    with torch.no_grad():
        got = llama(ids, attention_mask=mask, **cache_kw(cache)).logits
        ref = llama(ids, attention_mask=mask, **cache_kw(ref_cache)).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        nxt = got[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        got2 = llama(nxt, attention_mask=mask2, **cache_kw(cache)).logits
        ref2 = llama(nxt, attention_mask=mask2, **cache_kw(ref_cache)).logits
    torch.testing.assert_close(got2, ref2, atol=1e-5, rtol=1e-5)
    per_layer = cache.layer_bytes()
    assert [g["kv_heads"] for g in per_layer[0]["groups"]] == [[0, 2], [1]]
    assert (
        sum(x["bytes"] for x in per_layer)
        == cache.nbytes()
        == plan.predicted_kv_bytes(ids.shape[1] + 1, batch=2)
    )


def test_attend_layer_gqa_mapping_against_reference():
    """A layer with bf16 storage on KV heads 0 and 2 and fp32 on head 1, G=2: prefill then decode,
    compared with reference_attention over K/V rounded the way each head stores them."""
    torch.manual_seed(0)
    B, Hk, G, D, T = 2, 3, 2, 16, 7
    strategies = [from_spec({"name": "full", "dtype": d}) for d in ("bfloat16", "model", "bfloat16")]
    layer = KVCompileLayer(0, strategies, head_dim=D, gqa=G)
    ks, vs, outs, qs = [], [], [], []
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False  # left padding in row 1
    for step, n in enumerate((T, 1)):
        q, k, v = torch.randn(B, Hk * G, n, D), torch.randn(B, Hk, n, D), torch.randn(B, Hk, n, D)
        k2, v2 = layer.update(k, v)
        assert k2 is k and v2 is v
        assert pending().pop(id(k))[1] is layer  # what the attention function will look up
        outs.append(
            attend_layer(layer, q, k, v, valid if step == 0 else torch.ones(B, 1, dtype=torch.bool), 0.25)
        )
        ks.append(k)
        vs.append(v)
        qs.append(q)
    assert layer.get_seq_length() == T + 1
    # reference for the decode step: past keys as stored (bf16 on heads 0, 2), the new key exact
    rounded = torch.tensor([1, 0, 1], dtype=torch.bool)[None, :, None, None]
    past_k = torch.where(rounded, ks[0].bfloat16().float(), ks[0])
    past_v = torch.where(rounded, vs[0].bfloat16().float(), vs[0])
    k_all, v_all = torch.cat([past_k, ks[1]], 2), torch.cat([past_v, vs[1]], 2)
    key_mask = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], 1)[:, None, :]
    ref, _ = reference_attention(qs[1], k_all, v_all, key_mask, 0.25, causal_new=1)
    torch.testing.assert_close(outs[1], ref, atol=1e-5, rtol=1e-5)
    # prefill: exact keys, causal, padding keys masked (row 1's padding queries are don't-care)
    ref0, _ = reference_attention(qs[0], ks[0], vs[0], valid[:, None, :], 0.25, causal_new=T)
    torch.testing.assert_close(outs[0][0], ref0[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1, :, 3:], ref0[1, :, 3:], atol=1e-5, rtol=1e-5)


def test_group_heads_maps_query_heads():
    full, bf16 = from_spec({"name": "full"}), from_spec({"name": "full", "dtype": "bfloat16"})
    groups = group_heads([bf16, full, bf16, full], gqa=3)
    assert [(g.strategy, g.kv_heads, g.q_heads) for g in groups] == [
        (bf16, (0, 2), (0, 1, 2, 6, 7, 8)),
        (full, (1, 3), (3, 4, 5, 9, 10, 11)),
    ]


def test_new_token_validity_from_masks():
    B, T, K = 2, 3, 5
    assert new_token_validity(None, B, T, torch.device("cpu")).all()
    allowed = torch.ones(B, 1, T, K, dtype=torch.bool).tril(K - T)
    allowed[1, :, :, :3] = False  # row 1: first 3 columns are padding
    expect = torch.tensor([[True, True, True], [False, True, True]])
    assert torch.equal(new_token_validity(allowed, B, T, torch.device("cpu")), expect)
    additive = torch.zeros(B, 1, T, K).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert torch.equal(new_token_validity(additive, B, T, torch.device("cpu")), expect)
    assert torch.equal(new_token_validity(allowed[:, 0, -1].long(), B, T, torch.device("cpu")), expect)
    # a sliding-window mask hides early new keys from the LAST row; they are still real tokens
    window = torch.ones(1, 1, T, K, dtype=torch.bool).tril(K - T).triu(K - T - 1)
    assert new_token_validity(window, B, T, torch.device("cpu")).all()
    with pytest.raises(ValueError, match="2D or 4D"):
        new_token_validity(torch.ones(B, 1, K), B, T, torch.device("cpu"))


def test_question_agnostic_prefill_then_generate(gpt2):
    """Prefill a context, then generate from context+question: only the question runs on the cache."""
    ctx, question = _rows(4, [20, 6])
    full = torch.tensor([ctx + question])
    cache = make_cache(uniform_plan(gpt2, "full", context=512), gpt2)
    with torch.no_grad():
        gpt2(torch.tensor([ctx]), **cache_kw(cache))
    assert cache.get_seq_length() == len(ctx)
    out = _generate(gpt2, full, torch.ones_like(full), cache)
    ref = _generate(gpt2, full, torch.ones_like(full), DynamicCache(config=gpt2.config))
    assert torch.equal(out, ref)


def test_sampling_yields_valid_reproducible_tokens(llama):
    plan = uniform_plan(llama, "full", context=512)
    ids, mask = _batch(_rows(5, [8, 5]))
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(_generate(llama, ids, mask, make_cache(plan, llama), do_sample=True, top_k=20))
    assert torch.equal(outs[0], outs[1])
    new = outs[0][:, ids.shape[1] :]
    assert new.shape == (2, 12) and int(new.min()) >= 0 and int(new.max()) < VOCAB


# ---- plan checks: bad input is rejected at make_cache, before any generation ---------------------
def _edit_sites(plan, **changes):
    sites = [s.model_copy(update=changes) for s in plan.model.sites]
    return plan.model_copy(update={"model": plan.model.model_copy(update={"sites": sites})})


def test_rejects_layer_count_mismatch(gpt2):
    plan = uniform_plan(gpt2, "full", context=512)
    short = plan.model_copy(update={"layers": plan.layers[:1]})
    with pytest.raises(PlanError, match=r"plan has 1 layers .* model has 2"):
        make_cache(short, gpt2)


def test_rejects_kv_head_count_mismatch(llama):
    plan = uniform_plan(llama, "full", context=512)
    layers = [lp.model_copy(update={"heads": lp.heads[:2]}) for lp in plan.layers]
    with pytest.raises(PlanError, match="2 KV-head strategies .* model has 3 KV heads"):
        make_cache(plan.model_copy(update={"layers": layers}), llama)
    with pytest.raises(PlanError, match="query heads"):
        make_cache(_edit_sites(plan, num_q_heads=9), llama)


def test_rejects_head_dim_mismatch(llama):
    plan = _edit_sites(uniform_plan(llama, "full", context=512), head_dim=64, v_head_dim=64)
    with pytest.raises(PlanError, match="head_dim 64 .* model head_dim 16"):
        make_cache(plan, llama)


def test_rejects_unknown_strategy_and_bad_backend(gpt2):
    plan = uniform_plan(gpt2, "full", context=512)
    layers = [lp.model_copy(update={"heads": [{"name": "nope"}] * len(lp.heads)}) for lp in plan.layers]
    with pytest.raises(PlanError, match="unknown strategy 'nope'"):
        make_cache(plan.model_copy(update={"layers": layers}), gpt2)
    with pytest.raises(ValueError, match="backend='cuda-magic'"):
        make_cache(plan, gpt2, backend="cuda-magic")


@pytest.mark.skipif("sink_window" not in REGISTRY, reason="sink_window not registered yet")
def test_rejects_window_larger_than_context(gpt2):
    plan = uniform_plan(gpt2, "full", context=256)
    bad = {"name": "sink_window", "sinks": 4, "window": 1000}
    layers = [lp.model_copy(update={"heads": [bad] * len(lp.heads)}) for lp in plan.layers]
    with pytest.raises(PlanError, match="layer 0 head 0: sink_window"):
        make_cache(plan.model_copy(update={"layers": layers}), gpt2)


def test_fingerprint_mismatch_warns_or_fails_when_strict(gpt2):
    plan = uniform_plan(gpt2, "full", context=512)
    edited = plan.model.model_copy(update={"fingerprint": "0" * 20})
    with pytest.raises(PlanError, match="fingerprint .* other real weights"):  # compiled from real weights
        make_cache(plan.model_copy(update={"model": edited}), gpt2)
    other = plan.model_copy(update={"model": edited.model_copy(update={"on_meta": True})})  # from a config
    with pytest.warns(PlanWarning, match="fingerprint"):
        cache = make_cache(other, gpt2)
    assert isinstance(cache, KVCompileCache) and cache.notes
    with pytest.raises(PlanError, match="strict"):
        make_cache(other, gpt2, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_cache(plan, gpt2, strict=True)


def test_cache_operations_and_their_clear_errors(gpt2):
    plan = uniform_plan(gpt2, "full", context=512)
    cache = make_cache(plan, gpt2)
    with torch.no_grad():
        gpt2(torch.tensor([[5, 6, 7]]), **cache_kw(cache))
    cache.reorder_cache(torch.tensor([0, 0]))
    assert cache.layers[0].batch_size == 2 and cache.nbytes() == plan.predicted_kv_bytes(3, batch=2)
    cache.crop(-1)
    assert cache.get_seq_length() == 2 and cache.nbytes() == plan.predicted_kv_bytes(2, batch=2)
    h2o = make_cache(uniform_plan(gpt2, {"name": "heavy_hitter", "budget": 4, "recent": 2}, context=512), gpt2)
    with torch.no_grad():
        gpt2(torch.tensor([[5, 6, 7]]), **cache_kw(h2o))
    with pytest.raises(NotImplementedError, match="cannot crop"):
        h2o.crop(-1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0


@pytest.mark.gpu
def test_cuda_mixed_plan_matches_dynamic_cache(llama):
    """Stores, head-group indices and masks live on the model's device."""
    model = copy.deepcopy(llama).cuda()
    plan = mixed_plan(model, [{"name": "full"}, {"name": "full", "dtype": "float32"}], context=512)
    ids, mask = (t.cuda() for t in _batch(_rows(6, [10, 4])))
    cache, ref_cache = make_cache(plan, model), DynamicCache(config=model.config)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, **cache_kw(cache)).logits
        ref = model(ids, attention_mask=mask, **cache_kw(ref_cache)).logits
        nxt = ref[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        got2 = model(nxt, attention_mask=mask2, **cache_kw(cache)).logits
        ref2 = model(nxt, attention_mask=mask2, **cache_kw(ref_cache)).logits
    torch.testing.assert_close(got[1, 6:], ref[1, 6:], atol=1e-4, rtol=1e-4)  # row 1's padding is don't-care
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got2, ref2, atol=1e-4, rtol=1e-4)
    assert all(t.is_cuda for _, s in cache.stores(0) for t in s.tensors().values())
