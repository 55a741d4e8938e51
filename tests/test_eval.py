"""Evaluation harness: sample construction, scoring, perplexity vs a direct reference, the
question-agnostic path, and the ``kvcompile eval`` CLI (small sizes; the real model via ``smol``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvcompile.eval import (
    evaluate,
    generate_answer,
    is_correct,
    make_niah_sample,
    make_passkey_sample,
    make_ppl_sample,
    sample_nll,
)
from kvcompile.eval.cli import main
from kvcompile.eval.data import extract_number


def _full_plan(model, context):
    builders = pytest.importorskip("kvcompile.runtime.builders")
    return builders.uniform_plan(model, {"name": "full"}, context=context)


# ---- samples ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [512, 1024, 2048])
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_sample_places_key_at_depth(smol, length, depth):
    tok = smol.tokenizer
    s = make_passkey_sample(tok, length, seed=3, depth=depth)
    assert abs(s.length - length) <= 0.05 * length
    assert len(s.answer) == 5 and s.answer.isdigit()
    (pos,) = s.meta["needle_token_pos"]
    hay = s.meta["haystack_tokens"]
    # inserted at the sentence boundary nearest the requested depth
    assert abs(pos / hay - depth) < 0.06, (pos, hay, depth)
    start = s.meta["haystack_start"] + pos
    needle_text = tok.decode(s.ids[0, start : start + 20])
    assert f"The pass key is {s.answer}." in needle_text
    # the key appears only in the needle, and the question + answer prefix come after the context
    full = tok.decode(s.ids[0])
    assert full.count(s.answer) == 2
    tail = tok.decode(s.ids[0, s.context_len :])
    assert "What is the pass key?" in tail and tail.rstrip().endswith("The pass key is")
    assert s.answer not in tail


def test_passkey_sample_is_deterministic(smol):
    tok = smol.tokenizer
    a, b = make_passkey_sample(tok, 768, seed=11), make_passkey_sample(tok, 768, seed=11)
    c = make_passkey_sample(tok, 768, seed=12)
    assert torch.equal(a.ids, b.ids) and a.answer == b.answer and a.meta == b.meta
    assert a.answer != c.answer or not torch.equal(a.ids, c.ids)


def test_passkey_sample_rejects_bad_input(smol):
    with pytest.raises(ValueError, match="depth"):
        make_passkey_sample(smol.tokenizer, 512, seed=0, depth=1.5)
    with pytest.raises(ValueError, match="length"):
        make_passkey_sample(smol.tokenizer, 40, seed=0)


def test_niah_sample_holds_every_needle(smol):
    tok = smol.tokenizer
    s = make_niah_sample(tok, 1024, seed=5, needles=4)
    text = tok.decode(s.ids[0, : s.context_len])
    for name, key in zip(s.meta["names"], s.meta["keys"], strict=True):
        assert f"The pass key for {name} is {key}." in text
    assert s.answer == s.meta["keys"][s.meta["asked_index"]]
    assert f"What is the pass key for {s.meta['asked']}?" in tok.decode(s.ids[0, s.context_len :])
    assert abs(s.length - 1024) <= 51
    with pytest.raises(ValueError, match="needles"):
        make_niah_sample(tok, 1024, seed=5, needles=1)


def test_exact_match_scoring():
    assert is_correct(" 12345.", "12345")
    assert is_correct(" 12345 is the pass key", "12345")
    assert not is_correct(" 1234", "12345")
    assert not is_correct(" 123456", "12345")  # longer numbers are not an exact match
    assert not is_correct(" a special syntax", "12345")
    assert not is_correct(" 54321 or 12345", "12345")  # only the first number counts
    assert extract_number("no digits") is None


def test_as_cache_factory_forms(tmp_path):
    from kvcompile.eval import as_cache_factory

    class Holder:
        def make_cache(self, model, **kw):
            return ("cache-of", model)

    assert as_cache_factory(None)("m", 10) is None  # DynamicCache
    assert as_cache_factory(Holder().make_cache)("m", 10) == ("cache-of", "m")  # one-argument factory
    assert as_cache_factory(lambda model, tokens: tokens)("m", 10) == 10
    with pytest.raises(TypeError, match="cache factory"):
        as_cache_factory(3)
    from kvcompile.plan import PlanError

    with pytest.raises(PlanError, match="cannot read"):
        as_cache_factory(tmp_path / "missing.kvplan")


# ---- perplexity -----------------------------------------------------------------------------------------
@torch.no_grad()
def _reference_ppl(model, sample):
    logits = model(sample.ids).logits[0].float()
    ctx = sample.context_len
    nll = torch.nn.functional.cross_entropy(logits[ctx - 1 : -1], sample.ids[0, ctx:], reduction="mean")
    return math.exp(nll.item())


@pytest.mark.slow
def test_ppl_equals_direct_logits_reference(smol):
    model = smol.model
    s = make_ppl_sample(smol.tokenizer, context=96, target=37, seed=1)
    assert s.length == 133 and s.context_len == 96
    ref = _reference_ppl(model, s)
    for chunk in (8, 5, 64):
        from transformers import DynamicCache

        nll, n = sample_nll(model, s, DynamicCache(config=model.config), chunk=chunk)
        assert n == 37
        assert math.exp(nll / n) == pytest.approx(ref, rel=1e-4)
    cache = _full_plan(model, 256).make_cache(model)
    nll, n = sample_nll(model, s, cache, chunk=8)
    assert math.exp(nll / n) == pytest.approx(ref, rel=1e-4)
    assert cache.nbytes() == (s.length - 1) * 2 * 30 * 3 * 64 * 4  # every fed token, fp32 K and V


# ---- question-agnostic vs one prefill ----------------------------------------------------------------
@pytest.mark.slow
def test_question_agnostic_full_cache_matches_single_prefill(smol):
    from transformers import DynamicCache

    model, tok = smol.model, smol.tokenizer
    s = make_passkey_sample(tok, 384, seed=2, depth=0.5)
    one, _ = generate_answer(model, tok, s, DynamicCache(config=model.config), question_aware=True)
    two, n = generate_answer(model, tok, s, DynamicCache(config=model.config), question_aware=False)
    assert one == two
    assert is_correct(one, s.answer), one
    assert s.length <= n <= s.length + 9  # prompt + generated tokens (generation may stop at EOS)
    plan = _full_plan(model, 512)
    three, _ = generate_answer(model, tok, s, plan.make_cache(model), question_aware=False)
    assert three == one


@pytest.mark.slow
def test_evaluate_counts_bytes_and_accuracy(smol):
    res = evaluate(None, smol, tasks=("passkey",), lengths=(256,), samples=2, progress=False)
    (r,) = res["results"]
    assert r["task"] == "passkey" and r["n"] == 2 and r["accuracy"] in (0.0, 0.5, 1.0)
    assert r["kv_ratio"] == pytest.approx(1.0)  # a DynamicCache holds every token in fp32
    assert res["config"]["setting"] == "question-agnostic"
    with pytest.raises(ValueError, match="tasks"):
        evaluate(None, smol, tasks=("bogus",))


# ---- CLI --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_writes_json(smol, tmp_path, capsys):
    pytest.importorskip("kvcompile.runtime.builders")
    out = tmp_path / "eval.json"
    rc = main(
        [
            "--uniform",
            '{"name": "full"}',
            "--tasks",
            "passkey,niah,ppl",
            "--lengths",
            "256",
            "--samples",
            "2",
            "--niah-length",
            "320",
            "--ppl-context",
            "96",
            "--ppl-target",
            "32",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"model", "results", "config", "source", "machine", "cache", "wall_s"} <= set(data)
    assert [(r["task"], r["length"]) for r in data["results"]] == [
        ("passkey", 256),
        ("niah", 320),
        ("ppl", 128),
    ]
    for r in data["results"]:
        assert {"n", "accuracy", "ppl", "kv_bytes", "kv_ratio", "wall_s", "details"} <= set(r)
        assert r["kv_ratio"] == pytest.approx(1.0, abs=0.01)
    assert data["results"][2]["ppl"] > 1
    assert data["machine"]["device"] in ("cpu", "cuda") and data["cache"]["kind"] == "uniform"
    assert "passkey" in capsys.readouterr().out
    assert main(["--tasks", "passkey"]) == 2  # neither a plan nor --uniform / --dynamic
