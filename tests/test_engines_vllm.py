"""A kvcompile plan executed by vLLM itself (in-process, one shared engine): capacity vLLM reports equals
the plan's prediction, the paged emulation reproduces vLLM's logits, bad plans are refused before start.

Skipped when vLLM is not importable (the main venv); ``make vllm`` builds ``.venv-vllm`` where it is.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: ~20 s start, no workers

import pytest  # noqa: E402
import torch  # noqa: E402

vllm = pytest.importorskip("vllm")

from kvcompile._compat import cache_kw  # noqa: E402
from kvcompile.engines import EngineError  # noqa: E402
from kvcompile.engines import vllm as ev  # noqa: E402
from kvcompile.runtime.builders import plan_for  # noqa: E402
from kvcompile.targets import load_target  # noqa: E402

pytestmark = pytest.mark.slow
CONTEXT, WINDOW, SINKS, MEM = 512, 64, 4, 64 << 20
# per layer (layer % 4): bf16 full / fp8 full / fp8 + window / fp8 + sinks + window (the plugin's own KV
# spec, block manager and attention); 8/8/7/7 layers, so vLLM pads its groups and the prediction must too
SETTINGS = [
    {"name": "paged", "kv_dtype": "bfloat16"},
    {"name": "paged", "kv_dtype": "fp8_e4m3"},
    {"name": "paged", "kv_dtype": "fp8_e4m3", "window": WINDOW},
    {"name": "paged", "kv_dtype": "fp8_e4m3", "window": WINDOW, "sinks": SINKS},
]
NO_SINKS = SETTINGS[:3] + [SETTINGS[2]]
# emulation tolerance: mean |log p(token)| difference over the prompt, in nats, vLLM vs kvcompile's paged
# stores on the same bf16 weights (what remains is bf16 arithmetic in different kernels)
EMULATION_TOL = 0.1


def _save(plan, path):
    plan.save(path)
    return path


@pytest.fixture(scope="module")
def served(smol, tmp_path_factory):
    plan = plan_for(smol, lambda layer, head: SETTINGS[layer % 4], CONTEXT, target="cpu")
    plan = plan.model_copy(update={"engine": ev.record(plan, load_target("cpu"))}).sealed()
    path = _save(plan, tmp_path_factory.mktemp("plan") / "mixed.kvplan")
    llm = ev.llm(path, kv_cache_memory_bytes=MEM)
    return plan, path, llm


def test_vllm_capacity_equals_the_plan_prediction(served):
    plan, _, llm = served
    cc = llm.llm_engine.vllm_config.cache_config
    site = plan.model.sites[0]
    pred = ev.predict_capacity(plan.engine["layers"], num_kv_heads=site.num_kv_heads, head_dim=site.head_dim,
                               max_model_len=CONTEXT, memory_bytes=MEM, block_size=ev.BLOCK_SIZE["cpu"])
    assert cc.kv_cache_size_tokens == pytest.approx(pred["tokens"], rel=0.05)
    # the windows and fp8 really are in vLLM's layers
    attn = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.model.layers
    got = [(layer.self_attn.attn.kv_cache_dtype, layer.self_attn.attn.sliding_window) for layer in attn]
    assert got == [(s["kv_cache_dtype"], s["sliding_window"]) for s in plan.engine["layers"]]
    from kvcompile.engines._vllm_sinks import SinkWindowImpl

    sunk = [i for i, layer in enumerate(attn) if isinstance(layer.self_attn.attn.impl, SinkWindowImpl)]
    assert sunk == [i for i, s in enumerate(plan.engine["layers"]) if s.get("sinks")] and sunk


def _token_logprobs_hf(model, ids, cache):
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=cache is not None, **(cache_kw(cache) if cache else {}))
    lp = torch.log_softmax(out.logits[0].float(), -1)
    return torch.stack([lp[t - 1, ids[t]] for t in range(1, len(ids))])


def _decode_logprobs_hf(model, ids, gen, cache):
    """log p(gen[k]) with the prompt prefilled, then one token at a time (the decode path)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True, **cache_kw(cache))
        lps = [torch.log_softmax(out.logits[0, -1].float(), -1)[gen[0]]]
        for a, b in zip(gen[:-1], gen[1:], strict=True):
            out = model(torch.tensor([[a]]), use_cache=True, **cache_kw(cache))
            lps.append(torch.log_softmax(out.logits[0, -1].float(), -1)[b])
    return torch.stack(lps)


def test_emulated_formats_reproduce_vllm_logits(served, smol):
    from kvcompile.models import load

    plan, _, llm = served
    bf16 = load("smollm2-135m", dtype=torch.bfloat16).model  # vLLM runs the weights in bf16
    text = " ".join(f"Item {i} is {'red' if i % 3 else 'blue'} and weighs {i * 7 % 11} kg." for i in range(60))
    # long enough that vLLM frees out-of-window blocks (128-token blocks: block 1 goes at 384 computed tokens)
    # while the sink layers keep block 0
    ids = smol.tokenizer(text)["input_ids"][:496]
    assert len(ids) == 496
    params = vllm.SamplingParams(max_tokens=8, prompt_logprobs=0, logprobs=0, temperature=0.0)
    out = llm.generate({"prompt_token_ids": ids}, params)[0]
    got = torch.tensor([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
    gen = list(out.outputs[0].token_ids)
    got_dec = torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, gen, strict=True)])

    def twin(settings):
        return plan_for(bf16, lambda layer, head: settings[layer % 4], CONTEXT, target="cpu").make_cache(bf16)

    emulated, no_sinks = _token_logprobs_hf(bf16, ids, twin(SETTINGS)), _token_logprobs_hf(bf16, ids, twin(NO_SINKS))
    full = _token_logprobs_hf(bf16, ids, None)
    err = {k: (got - x).abs().mean().item() for k, x in [("emulated", emulated), ("no_sinks", no_sinks),
                                                          ("full", full)]}
    err_dec = (got_dec - _decode_logprobs_hf(bf16, ids, gen, twin(SETTINGS))).abs().mean().item()
    print(f"mean |dlogp| vs vLLM over {len(ids) - 1} prompt tokens: {err}; over {len(gen)} decoded: {err_dec:.4f}")
    assert err["emulated"] < EMULATION_TOL, err
    assert err_dec < EMULATION_TOL, err_dec
    assert err["emulated"] < 0.5 * err["full"], err  # the windows/fp8 matter and are reproduced
    assert err["emulated"] < 0.5 * err["no_sinks"], err  # and vLLM really attends the sink tokens


def test_plans_vllm_must_not_run_are_refused_before_start(served, smol, tmp_path):
    plan, _, _ = served
    other_version = plan.model_copy(update={"engine": {**plan.engine, "version": "0.0.1"}}).sealed()
    with pytest.raises(EngineError, match="0.0.1"):
        ev.llm(_save(other_version, tmp_path / "v.kvplan"))
    other_model = plan.model_copy(update={"model": plan.model.model_copy(update={"fingerprint": "0" * 20})}).sealed()
    with pytest.raises(EngineError, match="another model"):
        ev.llm(_save(other_model, tmp_path / "m.kvplan"))
    int4 = plan_for(smol, lambda layer, head: {"name": "quant", "bits": 4}, CONTEXT, target="cpu")
    int4 = int4.model_copy(update={"engine": plan.engine}).sealed()
    with pytest.raises(EngineError, match="not executed by vLLM"):
        ev.llm(_save(int4, tmp_path / "q.kvplan"))



def test_run_suite_through_vllm_agrees_with_the_emulation(served):
    """Every eval family through vLLM vs ``suite.run_sample`` on the plan's emulation (bf16 weights): the lm
    NLL per token within the logit tolerance, the same first answers, and second turns (``twohop``,
    ``followup``) re-sent as the suite builds them, answered as the emulation answers that prompt."""
    import dataclasses

    from kvcompile.eval import suite
    from kvcompile.eval.tasks import continue_answer
    from kvcompile.models import load

    _, _, llm = served
    bf16 = load("smollm2-135m", dtype=torch.bfloat16)
    tok = bf16.tokenizer
    samples = [suite.make_sample(tok, fam, "test", 400, 3) for fam in suite.FAMILIES]
    got = ev.run_suite(llm, tok, samples)
    twin = plan_for(bf16.model, lambda layer, head: SETTINGS[layer % 4], CONTEXT, target="cpu")
    want = [suite.run_sample(bf16.model, tok, s, twin.make_cache(bf16.model)) for s in samples]
    for s, g, w in zip(samples, got, want, strict=True):
        assert (g["family"], g["seed"]) == (w["family"], w["seed"])
        if g["family"] == "lm":
            assert g["tokens"] == w["tokens"]
            assert abs(g["nll"] - w["nll"]) / g["tokens"] < EMULATION_TOL, (g, w)
            continue
        assert set(g) - {"turn2_ids"} == set(w) - {"kv_bytes"}
        assert g["generated"] == w["generated"]
        if "generated2" not in g:
            assert g["correct"] == w["correct"]
            continue
        tail = g["turn2_ids"]
        first = suite._answer_tokens(tok, g["generated"])
        assert tail[: len(first)] == first
        nxt = tok.decode(tail[len(first):])
        assert nxt.endswith(tok.decode(s.meta["followup"]) if g["family"] == "followup" else " is")
        # the second turn through the emulation from a fresh cache (one prefill, as vLLM sees the prompt; the
        # suite's own run reuses the cache, whose bf16 chunking can flip near-ties: 0.28 max |dlogp| measured)
        ids = torch.tensor([s.ids[0].tolist() + tail])
        text2, _ = continue_answer(bf16.model, tok, dataclasses.replace(s, ids=ids), twin.make_cache(bf16.model),
                                   max_new_tokens=suite.MAX_NEW)
        print(g["family"], repr(g["generated2"]), repr(text2), repr(w["generated2"]))
        assert g["generated2"] == text2
        answer = s.meta["answer2"] if g["family"] == "followup" else s.answer
        assert g["correct"] == suite.is_correct(text2, answer, () if g["family"] == "followup" else
                                                s.meta.get("distractors", ()))
