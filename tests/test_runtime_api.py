"""The whole transformers Cache API on the real SmolLM2-135M: every generation mode DynamicCache
supports gives the same greedy tokens with a kvcompile ``full`` plan (beam search, assisted decoding
with the model as its own assistant, prompt lookup, left-padded batches), compressed formats crop and
reorder rows where that is well defined, and malformed attention masks fail loudly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvcompile._compat import cache_kw
from kvcompile.runtime import make_cache, mixed_plan, uniform_plan

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of France is"
BACKENDS = ["torch", "cpu"]


@pytest.fixture(scope="module")
def ids(smol):
    return smol.tokenizer(PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def full_plan(smol):
    return uniform_plan(smol.model, "full", context=256)


def _gen(model, ids, cache, **kw):
    kw = {"max_new_tokens": 6, "do_sample": False, **kw}
    return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kw(cache), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mode",
    [
        {},
        {"num_beams": 2},
        {"prompt_lookup_num_tokens": 3},
        {"assistant": True},
    ],
    ids=["greedy", "beam2", "prompt_lookup", "assisted"],
)
def test_full_plan_matches_dynamic_cache(smol, ids, full_plan, backend, mode):
    model = smol.model
    mode = dict(mode)
    if mode.pop("assistant", False):
        mode["assistant_model"] = model
    want = _gen(model, ids, DynamicCache(config=model.config), **mode)
    got = _gen(model, ids, make_cache(full_plan, model, backend=backend), **mode)
    assert got.tolist() == want.tolist()


def test_left_padded_batch_matches_dynamic_cache(smol, full_plan):
    model, tok = smol.model, smol.tokenizer
    rows = [tok(p).input_ids for p in ("Hello, my name is", PROMPT)]
    n = max(map(len, rows))
    x = torch.tensor([[tok.pad_token_id] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    want = model.generate(x, **cache_kw(DynamicCache(config=model.config)), **kw)
    for backend in BACKENDS:
        got = model.generate(x, **cache_kw(make_cache(full_plan, model, backend=backend)), **kw)
        assert got.tolist() == want.tolist(), backend


KIVI = {"name": "quant", "bits": 4, "group": 16, "residual": 16}
SNAP_Q = {"name": "compose", "select": {"name": "snapkv", "budget": 40, "obs_window": 8}, "quant": KIVI}


def test_crop_of_residual_tokens_equals_never_seeing_them(smol, ids):
    """KIVI / compose: cropping tokens still in the fp residual restores the earlier state exactly."""
    model = smol.model
    plan = mixed_plan(model, [KIVI, SNAP_Q, "full"], context=256)
    a, b = make_cache(plan, model), make_cache(plan, model)
    extra = torch.tensor([[504, 2145, 314]])
    with torch.no_grad():
        model(ids, **cache_kw(a))
        model(ids, **cache_kw(b))
        model(extra, **cache_kw(b))
        b.crop(-3)
        assert b.get_seq_length() == a.get_seq_length() == ids.shape[1]
        assert b.nbytes() == a.nbytes()
        nxt = torch.tensor([[11]])
        la, lb = model(nxt, **cache_kw(a)).logits, model(nxt, **cache_kw(b)).logits
    torch.testing.assert_close(lb, la)


def test_crop_into_a_quantized_group_is_a_clear_error(smol, ids):
    model = smol.model
    cache = make_cache(mixed_plan(model, [KIVI], context=256), model)
    long = ids.repeat(1, 3)  # > residual + group tokens: some groups are quantized
    with torch.no_grad():
        model(long, **cache_kw(cache))
    with pytest.raises(NotImplementedError, match="un-quantized"):
        cache.crop(-(long.shape[1] - 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reorder_rows_of_compressed_cache(smol, backend):
    """reorder_cache / batch_select_indices on a mixed compressed cache equal running the rows apart."""
    model, tok = smol.model, smol.tokenizer
    plan = mixed_plan(model, [KIVI, SNAP_Q, {"name": "fp8"}], context=256)
    x = tok([PROMPT, PROMPT.replace("France", "Spain")], return_tensors="pt").input_ids
    both = make_cache(plan, model, backend=backend)
    one = make_cache(plan, model, backend=backend)
    with torch.no_grad():
        model(x, **cache_kw(both))
        model(x[1:], **cache_kw(one))
        both.reorder_cache(torch.tensor([1, 1]))
        both.batch_select_indices(torch.tensor([0]))
        assert both.nbytes() == one.nbytes()
        nxt = torch.tensor([[11]])
        torch.testing.assert_close(model(nxt, **cache_kw(both)).logits, model(nxt, **cache_kw(one)).logits)


@pytest.mark.parametrize("holes", ["hole", "right_pad"])
def test_mask_zeros_that_are_not_left_padding_raise(smol, ids, full_plan, holes):
    model = smol.model
    mask = torch.ones_like(ids)
    if holes == "hole":
        mask[0, 3] = 0
    else:
        mask[0, -2:] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=mask, **cache_kw(make_cache(full_plan, model)))


def test_prompt_longer_than_the_plan_context_warns_and_bytes_stay_predicted(smol, ids):
    from kvcompile.runtime import PlanWarning

    model = smol.model
    plan = mixed_plan(model, [KIVI, "full", {"name": "fp8"}], context=40)
    long = ids.repeat(1, 3)[:, :50]
    cache = make_cache(plan, model, backend="cpu")
    with pytest.warns(PlanWarning, match="exceeds the plan's context 40"), torch.no_grad():
        model(long, **cache_kw(cache))
    assert cache.nbytes() == plan.predicted_kv_bytes(50)
    assert cache.nbytes() > plan.predicted_kv_bytes(40)  # the overflow the warning names
