"""Capture: per-architecture structure read from the exported graph, checked against each model's config."""

from __future__ import annotations

import importlib
import math
import types

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

import kvcompile
from kvcompile.capture import CaptureError, capture
from kvcompile.ir import PosKind

capture_mod = importlib.import_module("kvcompile.capture")

# distinct head counts so a swapped q/kv or a wrong head_dim cannot pass by accident
_SMALL = dict(
    hidden_size=96, intermediate_size=128, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
    vocab_size=128,
)


def _small(arch: str):
    """(config, expected per-layer windows, expected positional kind, attn implementation)."""
    if arch == "llama":
        return T.LlamaConfig(**_SMALL, rope_theta=12345.0), [None] * 4, PosKind.ROPE, "sdpa"
    if arch == "qwen2":
        cfg = T.Qwen2Config(**_SMALL, use_sliding_window=True, sliding_window=5, max_window_layers=2)
        return cfg, [None, None, 5, 5], PosKind.ROPE, "sdpa"
    if arch == "mistral":
        return T.MistralConfig(**_SMALL, sliding_window=7), [7] * 4, PosKind.ROPE, "sdpa"
    if arch == "gemma2":
        cfg = T.Gemma2Config(**_SMALL, head_dim=24, sliding_window=6, query_pre_attn_scalar=20)
        return cfg, [6, None, 6, None], PosKind.ROPE, "eager"  # Gemma-2 refuses sdpa
    if arch == "phi3":
        return T.Phi3Config(**_SMALL, pad_token_id=0), [None] * 4, PosKind.ROPE, "sdpa"
    if arch == "gpt2":
        cfg = T.GPT2Config(n_embd=96, n_layer=3, n_head=6, vocab_size=128, n_positions=64)
        return cfg, [None] * 3, PosKind.LEARNED, "sdpa"
    raise KeyError(arch)


def _build(cfg, attn: str, device: str = "cpu"):
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2"])
def test_capture_matches_config(arch):
    cfg, windows, pos, attn = _small(arch)
    model = _build(cfg, attn)
    program = capture(model)

    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    assert program.num_layers == cfg.num_hidden_layers
    assert [s.layer for s in program.sites] == list(range(cfg.num_hidden_layers))
    for s, w in zip(program.sites, windows, strict=True):
        assert (s.num_q_heads, s.num_kv_heads, s.head_dim, s.v_head_dim) == (hq, hkv, head_dim, head_dim)
        assert s.gqa_group == hq // hkv
        assert s.sliding_window == w
        assert s.pos is pos
        assert s.dtype == "float32"
        assert str(s.layer) in s.module_path.split(".")
    expected_scale = cfg.query_pre_attn_scalar**-0.5 if arch == "gemma2" else 1 / math.sqrt(head_dim)
    assert program.sites[0].scale == pytest.approx(expected_scale)
    if pos is PosKind.ROPE:
        assert program.sites[0].rope_theta == pytest.approx(cfg.rope_parameters["rope_theta"])
    else:
        assert program.sites[0].rope_theta is None
    assert program.model.arch == type(model).__name__
    assert program.model.num_params == sum(p.numel() for p in model.parameters())
    assert program.model.vocab_size == 128 and program.model.hidden_size == 96
    assert not program.model.on_meta
    assert model.config._attn_implementation == attn  # capture restores the implementation it swapped
    kv_bytes = cfg.num_hidden_layers * 2 * hkv * head_dim * 4
    assert program.full_kv_bytes_per_token() == kv_bytes


def test_capture_eager_llama_falls_back_to_capture_attention():
    cfg, _, _, _ = _small("llama")
    model = _build(cfg, "eager")
    program = kvcompile.capture(model)  # the package-level entry point, after the module was imported
    assert {(s.num_q_heads, s.num_kv_heads, s.head_dim) for s in program.sites} == {(6, 2, 16)}
    assert model.config._attn_implementation == "eager"


def test_reduced_depth_meta_export_equals_full_depth(monkeypatch):
    """Deep meta models export a prefix covering every layer type; the result must equal a full export."""
    cfg = T.Gemma2Config(**{**_SMALL, "num_hidden_layers": 5}, head_dim=24, sliding_window=6)
    model = _build(cfg, "eager", device="meta")
    monkeypatch.setattr(capture_mod, "_FULL_DEPTH_MAX", 100)
    full = capture(model)
    monkeypatch.setattr(capture_mod, "_FULL_DEPTH_MAX", 2)
    reduced = capture(model)
    assert reduced.sites == full.sites
    assert reduced.model == full.model
    assert [s.sliding_window for s in reduced.sites] == [6, None, 6, None, 6]
    assert reduced.model.on_meta


def test_capture_reduced_plan_covers_each_layer_type():
    depth, rep = capture_mod._reduced_plan(["full"] * 28 + ["sliding"] * 4)
    assert depth == 29 and rep[:28] == [0] * 28 and rep[28:] == [28] * 4
    depth, rep = capture_mod._reduced_plan([None] * 80)
    assert depth == 2 and set(rep) == {0}


@pytest.mark.slow
def test_capture_smollm2_real_weights(smol):
    program = capture(smol.model, name=smol.name)
    cfg = smol.model.config
    assert program.num_layers == cfg.num_hidden_layers == 30
    assert {(s.num_q_heads, s.num_kv_heads, s.head_dim) for s in program.sites} == {(9, 3, 64)}
    assert all(s.pos is PosKind.ROPE and s.sliding_window is None for s in program.sites)
    assert program.sites[0].rope_theta == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert program.sites[0].scale == pytest.approx(1 / 8)
    assert program.model.name == "smollm2-135m" and not program.model.on_meta
    assert program.model.dtype == "float32"
    assert program.full_kv_bytes_per_token() == 2 * 30 * 3 * 64 * 4


# ---- failures ----------------------------------------------------------------------------------
class _NoConfig(torch.nn.Module):
    def forward(self, input_ids, use_cache=False):
        return input_ids.float()


class _NoSDPA(torch.nn.Module):
    """Attention written by hand (matmul + softmax): there is no SDPA node and no attention interface."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=1, model_type="toy")
        self.emb = torch.nn.Embedding(10, 8)

    def forward(self, input_ids, use_cache=False):
        x = self.emb(input_ids)
        return torch.softmax(x @ x.transpose(-1, -2), -1) @ x


def test_unsupported_model_without_config():
    with pytest.raises(CaptureError, match=r"_NoConfig: unsupported model: no transformers `config`"):
        capture(_NoConfig())


def test_unsupported_model_without_sdpa():
    with pytest.raises(CaptureError, match=r"_NoSDPA: no attention found.*scaled_dot_product_attention") as e:
        capture(_NoSDPA())
    assert "\n" not in str(e.value)


def test_graph_config_disagreement_is_an_error():
    cfg, _, _, _ = _small("llama")
    model = _build(cfg, "sdpa")
    model.config.num_key_value_heads = 3  # the modules were built with 2
    msg = r"LlamaForCausalLM: layer 0 .* graph has 2 KV heads but the config says 3"
    with pytest.raises(CaptureError, match=msg):
        capture(model)


def test_example_len_validation():
    with pytest.raises(ValueError, match="example_len"):
        capture(_NoConfig(), example_len=1)


def test_alibi_multi_query_falcon():
    cfg = T.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, alibi=True,
        new_decoder_architecture=False, multi_query=True,
    )
    program = capture(_build(cfg, "sdpa"))
    assert [(s.num_q_heads, s.num_kv_heads, s.head_dim) for s in program.sites] == [(4, 1, 16)] * 2
    assert all(s.pos is PosKind.ALIBI and s.rope_theta is None for s in program.sites)


def test_unsupported_bloom_names_the_class():
    cfg = T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64)
    with pytest.raises(CaptureError, match=r"^BloomForCausalLM: no attention found"):
        capture(_build(cfg, "eager"))


def test_export_facts_are_memoised_and_keyed_on_what_the_graph_depends_on(monkeypatch, tmp_path):
    """A second capture of the same model reads the cached graph facts (no export) and gives the same
    Program; a torn entry, another config or another attention implementation exports again."""
    monkeypatch.setenv("KVCOMPILE_CACHE_DIR", str(tmp_path))
    cfg, _, _, _ = _small("llama")
    model = _build(cfg, "sdpa")
    first = capture(model)
    calls = []
    real = capture_mod._export_and_read
    monkeypatch.setattr(capture_mod, "_export_and_read", lambda *a: calls.append(a) or real(*a))
    assert capture(model) == first and calls == []
    (entry,) = (tmp_path / "capture").iterdir()
    entry.write_text('{"read": [')  # torn by a killed writer
    assert capture(model) == first and len(calls) == 1
    assert capture(model) == first and len(calls) == 1  # rewritten whole
    other = capture(_build(T.LlamaConfig(**{**_SMALL, "num_key_value_heads": 3}, rope_theta=12345.0), "sdpa"))
    assert len(calls) == 2 and {s.num_kv_heads for s in other.sites} == {3}
    assert capture(_build(cfg, "eager")).sites == first.sites and len(calls) == 3
    bad = _build(cfg, "sdpa")
    bad.config.num_key_value_heads = 3  # the cached facts of `model` must not hide the disagreement
    with pytest.raises(CaptureError, match="graph has 2 KV heads but the config says 3"):
        capture(bad)
