"""KVzip-style context-reconstruction selection and the Knorm baseline: scores against an independent
eager computation, physical compaction with exact bytes, calibration reuse of observed mass."""

from __future__ import annotations

import pytest
import torch

from kvcompile._compat import cache_kw
from kvcompile.passes import calibration as cal
from kvcompile.strategies import Compose, KNorm, KVzip, Quant, SnapKV, from_spec
from kvcompile.strategies._select import SelectStore
from kvcompile.strategies.kvzip import injected_scores, kvzip_prefill, reconstruction_scores


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _eager_scores(model, ids):
    """Independent reference: the context twice in one eager forward; per layer the max attention the
    second copy's queries (and a KV head's query heads) give each first-copy token."""
    n = ids.shape[1]
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(torch.cat([ids, ids], 1), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(prev)
    hk = model.config.num_key_value_heads
    return [a[0, :, n:, :n].amax(1).view(hk, -1, n).amax(1)[None] for a in att]


def test_reconstruction_scores_match_eager_reference_and_reuse_a_cache():
    from transformers import DynamicCache

    model = _tiny()
    ids = torch.randint(0, 97, (1, 40))
    ref = _eager_scores(model, ids)
    got = reconstruction_scores(model, ids, chunk=64)  # one chunk: exactly the eager computation
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kw(cache), use_cache=True)
    again = reconstruction_scores(model, ids, chunk=64, cache=cache)
    assert cache.get_seq_length() == 40  # cropped back
    for a, b in zip(again, got, strict=True):
        torch.testing.assert_close(a, b)
    chunked = reconstruction_scores(model, ids, chunk=16)  # bounded memory: other chunks, still scores
    assert all(c.shape == (1, 2, 40) and bool((c > 0).all()) for c in chunked)
    assert model.config._attn_implementation == "sdpa"


def test_kvzip_prefill_compacts_to_the_budget_with_exact_bytes():
    from kvcompile.runtime import make_cache, uniform_plan

    model = _tiny()
    ids = torch.randint(0, 97, (1, 48))
    s = KVzip(budget=12, sinks=2)
    cache = make_cache(uniform_plan(model, s, context=48), model)
    kvzip_prefill(model, ids, cache)
    scores = reconstruction_scores(model, ids)
    for li in range(2):
        for _, store in cache.stores(li):
            assert store.k.shape[2] == 12 and store.pos.shape[-1] == 12
            kept = set(store.pos[0, 0].tolist())
            assert {0, 1} <= kept  # sinks
            top = set(scores[li][0, 0, 2:].topk(10).indices.add(2).tolist())
            assert kept - {0, 1} == top
    assert cache.nbytes() == 2 * 2 * s.bytes_for(48, 16, 4)  # layers x KV heads x exact bytes (fp32)
    assert from_spec(s.to_spec()) == s and from_spec(KNorm(budget=5).to_spec()) == KNorm(budget=5)


def test_without_scores_kvzip_falls_back_to_sinks_and_recent():
    s = KVzip(budget=8, sinks=2)
    k = torch.randn(1, 1, 20, 4)
    store = s.new_store(batch=1, num_heads=1, head_dim=4, gqa=1, dtype=torch.float32, device="cpu")
    store.append(k, k, None, torch.ones(1, 20, dtype=torch.bool))
    assert store.pos[0, 0].tolist() == [0, 1, 14, 15, 16, 17, 18, 19]
    store2 = s.new_store(batch=1, num_heads=1, head_dim=4, gqa=1, dtype=torch.float32, device="cpu")
    with injected_scores(torch.arange(20.0).flip(0)[None, None]):
        store2.append(k, k, None, torch.ones(1, 20, dtype=torch.bool))
    assert store2.pos[0, 0].tolist() == list(range(8))


def test_knorm_keeps_lowest_norm_keys():
    k = torch.randn(1, 1, 16, 4)
    store = KNorm(budget=5).new_store(batch=1, num_heads=1, head_dim=4, gqa=1, dtype=torch.float32, device="cpu")
    store.append(k, k, None, torch.ones(1, 16, dtype=torch.bool))
    want = sorted(k[0, 0].norm(dim=-1).topk(5, largest=False).indices.tolist())
    assert store.pos[0, 0].tolist() == want and store.nbytes() == KNorm(budget=5).bytes_for(16, 4, 4)


@pytest.mark.parametrize("cands", [[SnapKV(budget=20, obs_window=8), SnapKV(budget=40, obs_window=8),
                                    SnapKV(budget=30, obs_window=4)]])
def test_calibration_mass_memo_is_exact(cands):
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    memo: dict = {}
    with_memo = [cal.head_errors(s, q, k, v, 90, 0.25, absolute=True, memo=memo) for s in cands]
    plain = [cal.head_errors(s, q, k, v, 90, 0.25, absolute=True) for s in cands]
    assert len(memo) == 2  # obs windows 8 and 4
    for a, b in zip(with_memo, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", [
    SnapKV(budget=20, obs_window=8), SnapKV(budget=30, obs_window=1, pool_kernel=1),
    Compose(select=SnapKV(budget=40, obs_window=6), quant=Quant(bits=4, group=16, residual=8))])
def test_observe_prefill_keeps_what_attend_keeps(strategy):
    """Calibration's score-only prefill (``SelectStore.observe_prefill``: the window's mass, no context
    output) keeps exactly the tokens a store that ran the full ``attend`` keeps."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 80, 16), torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16)
    ok = torch.ones(1, 80, dtype=torch.bool)
    stores = [strategy.new_store(batch=1, num_heads=2, head_dim=16, gqa=2, dtype=torch.float32, device="cpu")
              for _ in range(2)]
    stores[0].attend(q, k, v, ok, 0.25)
    sel = stores[1] if isinstance(stores[1], SelectStore) else stores[1].sel
    sel.observe_prefill(q, k, v, ok, 0.25)
    for s in stores:
        s.append(k, v, q, ok)
    q2, k2, v2 = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    outs = [s.attend(q2, k2, v2, torch.ones(1, 3, dtype=torch.bool), 0.25) for s in stores]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
