"""Runtime cache on the real SmolLM2-135M (GQA 9/3): generations vs DynamicCache, real bytes at 4k.

All tests load the model (``smol`` fixture) and are marked slow. The 4k byte checks run ONE prefill
forward per plan (no generation): a coverage plan whose 3 KV heads per layer use 3 different
strategies and that contains every registered strategy, and a uniform 2-bit KIVI plan.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvcompile import strategies
from kvcompile._compat import cache_kw
from kvcompile.ir import dtype_bytes
from kvcompile.plan import PlanError
from kvcompile.runtime import make_cache, plan_for, uniform_plan

pytestmark = pytest.mark.slow

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about a cat sleeping in the sun.",
    "List five fruits and one fact about each.",
    "What are the main differences between Python lists and tuples?",
    "Describe how to make a cup of tea, step by step.",
]
CONTEXT = 4096


def _chat_ids(tok, prompt: str) -> torch.Tensor:
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tok(text, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def full_plan(smol):
    return uniform_plan(smol.model, "full", context=CONTEXT)


def test_full_plan_reproduces_dynamic_cache_on_five_prompts(smol, full_plan):
    model, tok = smol.model, smol.tokenizer
    for prompt in PROMPTS:
        ids = _chat_ids(tok, prompt)
        kw = dict(max_new_tokens=25, min_new_tokens=20, do_sample=False)
        ref = model.generate(ids, **cache_kw(DynamicCache(config=model.config)), **kw)
        out = model.generate(ids, **cache_kw(make_cache(full_plan, model)), **kw)
        assert ref.shape[1] - ids.shape[1] >= 20
        assert out.tolist() == ref.tolist(), prompt


def test_left_padded_batch_rows_equal_single_runs(smol, full_plan):
    model, tok = smol.model, smol.tokenizer
    rows = [_chat_ids(tok, p)[0].tolist() for p in PROMPTS[:3]]
    n = max(map(len, rows))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    assert len({len(r) for r in rows}) == 3  # real padding in two rows
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=pad)
    out = model.generate(ids, attention_mask=mask, **cache_kw(make_cache(full_plan, model)), **kw)
    for i, r in enumerate(rows):
        single = model.generate(torch.tensor([r]), **cache_kw(make_cache(full_plan, model)), **kw)
        new = single[0, len(r) :].tolist()
        assert out[i, n : n + len(new)].tolist() == new


def test_sampling_with_compressed_plan(smol):
    model, tok = smol.model, smol.tokenizer
    plan = uniform_plan(model, {"name": "quant", "bits": 4} if "quant" in strategies.REGISTRY else "full")
    ids = _chat_ids(tok, PROMPTS[1])
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(
            model.generate(ids, **cache_kw(make_cache(plan, model)), max_new_tokens=15, do_sample=True)
        )
    assert runs[0].tolist() == runs[1].tolist()
    new = runs[0][0, ids.shape[1] :]
    assert 0 < len(new) <= 15 and int(new.min()) >= 0 and int(new.max()) < model.config.vocab_size


def test_question_agnostic_passkey(smol, full_plan):
    """Prefill the context alone, then generate from context+question: same answer as one prefill."""
    model, tok = smol.model, smol.tokenizer
    ctx = (
        "The grass is green. The sky is blue. " * 10
        + "The pass key is 48213. Remember it. "
        + ("The sun is yellow. Here we go. " * 10)
    )
    question = "Question: What is the pass key? Answer with the number. The pass key is"
    ctx_ids = tok(ctx, return_tensors="pt").input_ids
    ids = torch.cat([ctx_ids, tok(question, return_tensors="pt").input_ids], 1)
    cache = make_cache(full_plan, model)
    with torch.no_grad():
        model(ctx_ids, **cache_kw(cache))
    out = model.generate(ids, **cache_kw(cache), max_new_tokens=6, do_sample=False)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.tolist() == ref.tolist()
    assert "48213" in tok.decode(out[0, ids.shape[1] :])


def test_rejects_plan_for_other_geometry(smol, full_plan):
    sites = [s.model_copy(update={"num_kv_heads": 4}) for s in full_plan.model.sites]
    layers = [lp.model_copy(update={"heads": lp.heads + lp.heads[:1]}) for lp in full_plan.layers]
    bad = full_plan.model_copy(
        update={"layers": layers, "model": full_plan.model.model_copy(update={"sites": sites})}
    )
    with pytest.raises(PlanError, match="layer 0: plan has 4 KV-head strategies .* model has 3 KV heads"):
        make_cache(bad, smol.model)


# ---- real bytes at 4k tokens --------------------------------------------------------------------
def _instances(context: int) -> list[strategies.Strategy]:
    """One default instance per registered strategy name (auto-covers new ones), plus 2-bit KIVI."""
    grid = strategies.default_instances(context) if hasattr(strategies, "default_instances") else []
    out = []
    for name, cls in strategies.REGISTRY.items():
        inst = next((s for s in grid if s.name == name), None)
        if inst is None:
            try:
                inst = cls()
            except (TypeError, ValueError):
                continue  # no default instance yet (e.g. a composition needing sub-strategies)
        out.append(inst)
    if "quant" in strategies.REGISTRY:
        out.append(strategies.REGISTRY["quant"](bits=2, group=32))
    return out


def _prefill(model, plan, tokens: int):
    ids = torch.randint(100, 30000, (1, tokens), generator=torch.Generator().manual_seed(0))
    cache = make_cache(plan, model)
    with torch.no_grad():
        model(ids, **cache_kw(cache), logits_to_keep=1)
    return cache


@pytest.fixture(scope="module")
def coverage(smol):
    """A mixed plan: layer l, KV head h uses instance (3l + h) mod n, so the 3 heads of every layer
    use 3 different strategies and every instance appears; one 4k prefill through it."""
    insts = _instances(CONTEXT)
    if len(insts) < 3:
        pytest.skip("needs at least 3 registered strategies")
    plan = plan_for(smol.model, lambda layer, h: insts[(3 * layer + h) % len(insts)], context=CONTEXT)
    return plan, _prefill(smol.model, plan, CONTEXT)


def test_mixed_plan_bytes_match_prediction_at_4k(coverage):
    plan, cache = coverage
    assert cache.get_seq_length() == CONTEXT
    for lb in cache.layer_bytes():
        assert len(lb["groups"]) == 3  # three strategies in every layer
    predicted = plan.predicted_kv_bytes(CONTEXT)
    assert abs(cache.nbytes() - predicted) <= 0.03 * predicted
    assert cache.nbytes() < plan.full_kv_bytes(CONTEXT)


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_each_strategy_real_bytes_match_bytes_for_at_4k(coverage, name):
    plan, cache = coverage
    db = dtype_bytes(plan.model.dtype)
    checked = 0
    for layer, lb in enumerate(cache.layer_bytes()):
        for (group, store), g in zip(cache.stores(layer), lb["groups"], strict=True):
            if group.strategy.name != name:
                continue
            expect = group.strategy.bytes_for(CONTEXT, 64, db) * len(group.kv_heads)
            assert abs(store.nbytes() - expect) <= 0.03 * expect, (layer, g)
            assert (
                store.nbytes()
                == g["bytes"]
                == sum(t.numel() * t.element_size() for t in store.tensors().values())
            )
            checked += 1
    if not checked:
        pytest.skip(f"{name} has no default instance yet")


@pytest.mark.skipif("quant" not in strategies.REGISTRY, reason="quant not registered yet")
def test_uniform_quant2_stores_packed_codes_at_4k(smol):
    plan = uniform_plan(smol.model, {"name": "quant", "bits": 2, "group": 32}, context=CONTEXT)
    cache = _prefill(smol.model, plan, CONTEXT)
    assert abs(cache.nbytes() - plan.predicted_kv_bytes(CONTEXT)) <= 0.03 * plan.predicted_kv_bytes(CONTEXT)
    assert cache.nbytes() <= plan.full_kv_bytes(CONTEXT, dtype="float32") / 6
    for layer in (0, 29):
        [(group, store)] = cache.stores(layer)
        t = store.tensors()
        quantized = CONTEXT - t["k_res"].shape[2]
        assert quantized % 32 == 0 and quantized >= CONTEXT - 64
        for codes in (t["k_codes"], t["v_codes"]):
            assert codes.dtype == torch.uint8
            assert tuple(codes.shape) == (1, 3, quantized, 64 // 4)  # 4 two-bit codes per byte


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        {"name": "snapkv", "budget": 64, "obs_window": 16},
        {"name": "compose", "select": {"name": "snapkv", "budget": 64, "obs_window": 16},
         "quant": {"name": "quant", "bits": 4}},
        {"name": "heavy_hitter", "budget": 64, "recent": 16},
        {"name": "quant", "bits": 2},
    ],
    ids=lambda s: s["name"],
)
def test_prefill_then_decode_bytes_match_prediction(smol, spec):
    """Prefill 200 tokens, decode 7 more: nbytes equals predicted_kv_bytes(200, decoded=7) exactly."""
    plan = uniform_plan(smol.model, spec, context=512)
    cache = plan.make_cache(smol.model)
    ids = torch.randint(100, 5000, (1, 200), generator=torch.Generator().manual_seed(3))
    out = smol.model.generate(ids, **cache_kw(cache), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    decoded = out.shape[1] - ids.shape[1] - 1  # the last sampled token is never fed back
    assert cache.get_seq_length() == 200 + decoded
    assert cache.nbytes() == plan.predicted_kv_bytes(200, decoded=decoded)
