"""Calibration: set construction, per-head damage vs independent references, capture, cache, priors."""

from __future__ import annotations

import math
import time

import pytest
import torch

from kvcompile.passes import calibration as cal
from kvcompile.passes.calibration_set import build_sample, load_set
from kvcompile.strategies import Full, Quant, SinkWindow, Strategy, default_instances, reference_attention


def _qkv(n=160, hq=6, hk=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, n, d, generator=g), torch.randn(1, hk, n, d, generator=g),
            torch.randn(1, hk, n, d, generator=g))


def test_full_is_lossless_and_quant_error_grows_with_fewer_bits():
    q, k, v = _qkv()
    assert cal.head_errors(Full(), q, k, v, 128, 0.2).abs().max().item() < 1e-10
    errs = [cal.head_errors(Quant(bits=b, group=16), q, k, v, 128, 0.2) for b in (8, 4, 2)]
    assert (errs[0] < errs[1]).all() and (errs[1] < errs[2]).all() and (errs[0] > 0).all()


def test_sink_window_error_matches_independent_reference():
    q, k, v = _qkv()
    ctx, sinks, window, scale = 128, 4, 20, 0.2
    got = cal.head_errors(SinkWindow(sinks=sinks, window=window), q, k, v, ctx, scale)
    # StreamingLLM keeps positions [0, sinks) and the last `window` context tokens, then the new ones
    keep = torch.cat([torch.arange(sinks), torch.arange(ctx - window, ctx), torch.arange(ctx, q.shape[2])])
    t = q.shape[2] - ctx
    out = reference_attention(q[:, :, ctx:], k[:, :, keep], v[:, :, keep], None, scale, causal_new=t)[0]
    ref = reference_attention(q[:, :, ctx:], k, v, None, scale, causal_new=t)[0]
    err = (((out - ref) ** 2).sum(-1) / (ref**2).sum(-1)).view(2, 3, t)  # [Hk, G, t]
    # positions averaged with the final (answer) query weighted LAST_WEIGHT, then the G query heads
    expect = ((1 - cal.LAST_WEIGHT) * err.mean(-1) + cal.LAST_WEIGHT * err[..., -1]).mean(-1)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("strategy", [s for s in default_instances(256) if not cal.observes(s)],
                         ids=Strategy.label)
def test_skipping_context_attention_is_exact_for_non_observing(strategy, monkeypatch):
    q, k, v = _qkv(n=288, d=64)
    fast = cal.head_errors(strategy, q, k, v, 256, 0.125)
    monkeypatch.setattr(cal, "observes", lambda s: True)
    slow = cal.head_errors(strategy, q, k, v, 256, 0.125)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


def test_observing_strategies_are_detected():
    names = {s.name for s in default_instances(1024) if cal.observes(s)}
    assert {"heavy_hitter", "snapkv"} <= names and not names & {"full", "fp8", "quant", "sink_window"}


def test_rescale_scales_token_counts_only():
    s = [x for x in default_instances(4096) if x.name == "heavy_hitter"][0]
    r = cal.rescale(s, 0.25)
    assert (r.budget, r.recent) == (s.budget // 4, s.recent // 4)
    assert cal.rescale(Quant(bits=2), 0.25) == Quant(bits=2)
    nested = [x for x in default_instances(4096) if x.name == "compose"]
    if nested:
        r = cal.rescale(nested[0], 0.5)
        assert r.select.budget == round(nested[0].select.budget * 0.5) and r.quant == nested[0].quant


def test_calibration_set_spec_and_determinism(smol):
    tok = smol.tokenizer
    cset = load_set("default:3x256")
    assert len(cset.samples) == 3 and cset.tokens == 256 and cset.digest != load_set("default").digest
    kinds = set()
    for item in cset.samples:
        a, b = build_sample(tok, cset, item), build_sample(tok, cset, item)
        assert a == b and 0 < a.context_len < len(a.ids)
        kinds.add(a.kind)
        if item.get("ask") == "all":  # every fact asked, one turn each, every answer scored, asked one last
            context = tok.decode(list(a.ids[: a.context_len]))
            answers = [tok.decode(list(a.ids[x:y])).strip() for x, y in a.spans()]
            assert len(answers) == 4 and answers[-1] == a.answer + "." and a.spans()[-1][0] == a.answer_start
            assert all(ans.rstrip(".") in context for ans in answers) and len(set(answers)) == 4
            assert a.spans()[-1][1] == len(a.ids) and len(a.ids[: a.context_len]) <= 256
        elif a.kind != "lm":
            assert len(a.ids) <= 256 + 8
            assert a.answer in tok.decode(list(a.ids[: a.context_len]))
            assert a.answer not in tok.decode(list(a.ids[a.context_len: a.answer_start]))
            assert tok.decode(list(a.ids[a.answer_start:])).strip() == a.answer + "."
        else:
            assert a.answer_start == a.context_len + 1
    assert kinds == {"single", "multi", "lm"}  # calibration families; twohop/followup only verify
    # held-out items come from the disjoint verify split: other phrasings and texts
    v = build_sample(tok, cset, cset.heldout[0], split=cset.heldout_split)
    c = build_sample(tok, cset, cset.samples[0])
    assert tok.decode(list(v.ids[:40])) != tok.decode(list(c.ids[:40]))
    with pytest.raises(ValueError, match="calibration"):
        load_set("nope")
    with pytest.raises(ValueError, match="calibration"):
        load_set("default:x")


@pytest.mark.slow
def test_probe_captures_the_models_own_qkv(smol):
    model, tok = smol.model, smol.tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt").input_ids
    before = model.config._attn_implementation  # another test's make_cache may have switched it
    seen = {}
    hook = model.model.layers[2].self_attn.register_forward_hook(lambda m, a, o: seen.update(out=o[0]))
    probe = cal._Probe(record={})
    try:
        with torch.no_grad(), cal.probing(model, probe):
            model(ids, use_cache=False)
    finally:
        hook.remove()
    assert model.config._attn_implementation == before  # restored
    q, k, v = probe.record[2][0]
    assert q.shape[1] == 9 and k.shape[1] == 3 and q.shape[2] == ids.shape[1]
    attn = reference_attention(q, k, v, None, probe.scale[2], causal_new=ids.shape[1])[0]
    out = model.model.layers[2].self_attn.o_proj(attn.transpose(1, 2).reshape(1, ids.shape[1], -1))
    torch.testing.assert_close(out, seen["out"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_run_calibration_and_warm_cache(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE_DIR", str(tmp_path))
    cands = [Full(), Quant(bits=2, group=32), SinkWindow(sinks=4, window=60), Quant(bits=4, group=32)]
    kw = dict(context=256, calibration="default:1x256", progress=False)
    before = smol.model.config._attn_implementation  # another test's make_cache may have switched it
    cold = cal.run_calibration(smol.model, smol.tokenizer, cands, **kw)
    dmg = cold["damage"]
    assert not cold["cache_hit"] and len(dmg) == 30 and len(dmg[0]) == 3 and len(dmg[0][0]) == 4
    assert all(e[0] == 0.0 for layer in dmg for e in layer)  # full: lossless
    assert all(s >= 0 and math.isfinite(s) for s in cold["sensitivity"]) and max(cold["sensitivity"]) > 0
    assert all(e[1] > 0 and e[2] > 0 for layer in dmg for e in layer)
    # 4-bit KIVI codes err less than 2-bit ones: smaller predicted damage on nearly every head
    assert sum(e[3] < e[1] for layer in dmg for e in layer) >= 80
    t0 = time.perf_counter()
    warm = cal.run_calibration(smol.model, smol.tokenizer, cands, **kw)
    assert warm["cache_hit"] and time.perf_counter() - t0 < 5
    assert warm["damage"] == cold["damage"] and warm["sensitivity"] == cold["sensitivity"]
    assert smol.model.config._attn_implementation == before  # restored


def test_priors_monotone_in_compression():
    ctx = 4096
    grid = default_instances(ctx)
    sel = sorted((s for s in grid if s.name == "snapkv"), key=lambda s: s.budget)
    pri = [cal.prior_damage(s, ctx) for s in sel]
    assert all(a >= b for a, b in zip(pri, pri[1:], strict=False)) and pri[0] > pri[-1]
    q = [cal.prior_damage(Quant(bits=b), ctx) for b in (8, 4, 2)]
    assert q[0] < q[1] < q[2] and cal.prior_damage(Full(), ctx) == 0.0
