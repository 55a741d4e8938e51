"""Strategies inside the real SmolLM2-135M (GQA 9/3) through the runtime cache.

Lossless configurations of every compressing store (budgets/windows >= the sequence, an 8-bit
KIVI whose residual holds everything, ThinK keeping all channels) must reproduce the uncompressed
model's greedy tokens on a left-padded batch; lossy ones must stay close in logits where the
paper says they do (8-bit KIVI, fp8), and an aggressive budget must really change the output.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvcompile._compat import cache_kw
from kvcompile.runtime import make_cache, uniform_plan

pytestmark = pytest.mark.slow

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "List five fruits and one fact about each of them, please.",
]
NEW = 8

LOSSLESS = [
    {"name": "quant", "bits": 8, "group": 32, "residual": 4096},
    {"name": "sink_window", "sinks": 4, "window": 1000},
    {"name": "heavy_hitter", "budget": 1000, "recent": 16},
    {"name": "snapkv", "budget": 1000, "obs_window": 16},
    {"name": "think", "keep_ratio": 1.0},
    {"name": "mikv", "select": {"name": "heavy_hitter", "budget": 1000, "recent": 16}},
]


@pytest.fixture(scope="module")
def batch(smol):
    tok = smol.tokenizer
    rows = []
    for p in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        rows.append(tok(text).input_ids)
    n = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    assert mask[:, 0].tolist().count(0) == 1  # one row really is padded
    return ids, mask


def _generate(model, ids, mask, cache):
    return model.generate(
        ids,
        attention_mask=mask,
        **cache_kw(cache),
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
    )


@pytest.fixture(scope="module")
def reference(smol, batch):
    ids, mask = batch
    return _generate(smol.model, ids, mask, DynamicCache(config=smol.model.config))


@pytest.mark.parametrize("spec", LOSSLESS, ids=lambda s: s["name"])
def test_lossless_configs_reproduce_full_cache_tokens(smol, batch, reference, spec):
    ids, mask = batch
    plan = uniform_plan(smol.model, spec, context=8192)
    out = _generate(smol.model, ids, mask, make_cache(plan, smol.model))
    assert out.tolist() == reference.tolist()


@torch.no_grad()
def _logits(model, ids, cache):
    return model(ids, **cache_kw(cache), use_cache=True).logits[0, -1].float()


@pytest.mark.parametrize(
    "spec,tol",
    [
        ({"name": "quant", "bits": 8, "group": 32, "residual": 32}, 0.01),  # measured 0.0014
        ({"name": "fp8"}, 0.08),  # measured 0.019
        ({"name": "quant", "bits": 2, "group": 32, "residual": 32}, None),  # measured 0.54
        ({"name": "sink_window", "sinks": 4, "window": 28}, None),  # measured 0.20
    ],
    ids=["kivi8", "fp8", "kivi2", "sink32"],
)
def test_compressed_context_next_token_logits(smol, spec, tol):
    """A 300-token context compressed by the strategy, then one question chunk: the final logits
    stay within ``tol`` (relative L2) of the full cache for near-lossless formats, and visibly move
    for aggressive ones (the compression is real, not simulated)."""
    model, tok = smol.model, smol.tokenizer
    ctx = tok("The quick brown fox jumps over the lazy dog. " * 30, return_tensors="pt").input_ids[:, :300]
    qst = tok(" Question: which animal jumps? Answer:", return_tensors="pt").input_ids
    full = DynamicCache(config=model.config)
    _logits(model, ctx, full)
    ref = _logits(model, qst, full)
    cache = make_cache(uniform_plan(model, spec, context=1024), model)
    _logits(model, ctx, cache)
    got = _logits(model, qst, cache)
    rel = ((got - ref).norm() / ref.norm()).item()
    if tol is not None:
        assert rel < tol, rel
    else:
        assert rel > 1e-3, rel
