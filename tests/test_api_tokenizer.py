"""The headline API calibrates a plain nn.Module, and never silently falls back to priors."""

from __future__ import annotations

import pytest
import torch

from kvcompile.api import find_tokenizer, optimize

SPECS = [{"name": "full"}, {"name": "quant", "bits": 4}, {"name": "sink_window", "sinks": 4, "window": 60}]


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_real_weights_without_tokenizer_raises_naming_the_argument():
    model = _tiny_llama()
    assert find_tokenizer(model) is None
    with pytest.raises(ValueError, match=r"tokenizer=") as e:
        optimize(model, context=256, kv_budget=0.5, progress=False, candidates=SPECS)
    assert "\n" not in str(e.value)


def test_no_budget_needs_no_tokenizer():
    plan = optimize(_tiny_llama(), context=256, progress=False)
    assert all(h["name"] == "full" for layer in plan.layers for h in layer.heads)


def test_explicit_priors_give_an_unverified_plan_that_inspect_names(tmp_path, capsys):
    from kvcompile.cli import main

    plan = optimize(_tiny_llama(), context=256, kv_budget=0.9, progress=False, candidates=SPECS, damage="priors")
    assert plan.predicted["damage_source"] == "priors" and plan.measured is None
    assert any(n.startswith("UNVERIFIED") and "damage='priors'" in n for n in plan.notes)
    path = tmp_path / "p.kvplan"
    plan.save(path)
    assert main(["inspect", str(path)]) == 0
    assert "UNVERIFIED" in capsys.readouterr().out


def test_bad_damage_option_is_one_line():
    with pytest.raises(ValueError, match=r"damage='magic'"):
        optimize(_tiny_llama(), context=256, kv_budget=0.5, progress=False, damage="magic")


@pytest.mark.slow
def test_plain_module_finds_its_tokenizer_and_calibrates(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE_DIR", str(tmp_path))
    tok = find_tokenizer(smol.model)  # the local HF copy models.load made (config._name_or_path)
    assert tok is not None and tok("pass key")["input_ids"] == smol.tokenizer("pass key")["input_ids"]
    plan = optimize(smol.model, context=256, kv_budget=0.6, progress=False, candidates=SPECS,
                    calibration="default:1x256", verify_tokens=256, verify_samples=1)
    assert plan.predicted["damage_source"] == "calibration"
    assert plan.measured is not None and plan.measured["samples"] >= 1
    assert not any(n.startswith("UNVERIFIED") for n in plan.notes)


def test_kv_dtype_plans_a_bf16_cache_on_an_fp32_copy(tmp_path):
    from kvcompile.plan import load

    model = _tiny_llama()  # float32 weights
    plan = optimize(model, context=256, kv_budget=0.9, progress=False, candidates=SPECS, damage="priors",
                    kv_dtype="bfloat16")
    assert plan.model.dtype == "bfloat16" and plan.config.planner.kv_dtype == "bfloat16"
    assert plan.predicted["full_kv_bytes_at_context"] == plan.predicted["full_bf16_kv_bytes_at_context"]
    plan.save(tmp_path / "p.kvplan")
    assert load(tmp_path / "p.kvplan").content_hash == plan.content_hash  # bytes consistent on load
    with pytest.raises(ValueError, match="kv_dtype"):
        optimize(model, context=256, kv_budget=0.9, progress=False, damage="priors", kv_dtype="int4")
