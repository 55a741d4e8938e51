"""Shipped model configs: captured on the meta device, full-cache KV bytes/token vs hand-computed values."""

from __future__ import annotations

import json

import pytest

from kvcompile.capture import capture
from kvcompile.models import ModelLoadError, builtin_configs, load

# 2 (K and V) * layers * kv_heads * head_dim * 2 bytes (bf16), from each model's published architecture table
FULL_BF16_KV_BYTES_PER_TOKEN = {
    "llama-3-8b": 2 * 32 * 8 * 128 * 2,  # 131072
    "llama-3-70b": 2 * 80 * 8 * 128 * 2,  # 327680
    "qwen2.5-7b": 2 * 28 * 4 * 128 * 2,  # 57344
    "mistral-7b": 2 * 32 * 8 * 128 * 2,  # 131072
    "gemma-2-9b": 2 * 42 * 8 * 256 * 2,  # 344064
    "phi-3-mini": 2 * 32 * 32 * 96 * 2,  # 393216
    "gpt2": 2 * 12 * 12 * 64 * 2,  # 36864
}
# (layers, q heads, kv heads, head_dim, sliding window of layer 0, of layer 1)
ARCH = {
    "llama-3-8b": (32, 32, 8, 128, None, None),
    "llama-3-70b": (80, 64, 8, 128, None, None),
    "qwen2.5-7b": (28, 28, 4, 128, None, None),
    "mistral-7b": (32, 32, 8, 128, 4096, 4096),
    "gemma-2-9b": (42, 16, 8, 256, 4096, None),  # local/global alternate, local first
    "phi-3-mini": (32, 32, 32, 96, 2047, 2047),
    "gpt2": (12, 12, 12, 64, None, None),
}


def test_every_shipped_config_has_hand_numbers():
    assert set(builtin_configs()) == set(FULL_BF16_KV_BYTES_PER_TOKEN)
    assert FULL_BF16_KV_BYTES_PER_TOKEN["llama-3-8b"] == 131072
    assert FULL_BF16_KV_BYTES_PER_TOKEN["llama-3-70b"] == 327680


@pytest.mark.parametrize("name", sorted(FULL_BF16_KV_BYTES_PER_TOKEN))
def test_config_kv_bytes_and_structure(name):
    loaded = load(name)
    program = capture(loaded.model, name=name)
    assert program.model.on_meta and program.model.dtype == "bfloat16"
    assert program.full_kv_bytes_per_token() == FULL_BF16_KV_BYTES_PER_TOKEN[name]
    assert program.full_kv_bytes_per_token("bfloat16") == FULL_BF16_KV_BYTES_PER_TOKEN[name]
    layers, hq, hkv, d, w0, w1 = ARCH[name]
    assert program.num_layers == layers
    assert {(s.num_q_heads, s.num_kv_heads, s.head_dim) for s in program.sites} == {(hq, hkv, d)}
    assert [s.sliding_window for s in program.sites[:2]] == [w0, w1]
    if name == "gemma-2-9b":
        assert [s.sliding_window for s in program.sites] == [4096, None] * 21
    assert program.sites[-1].module_path.split(".")[-2] == str(layers - 1)


def test_load_config_json_path(tmp_path):
    raw = json.loads((load.__globals__["_CONFIG_DIR"] / "llama-3-8b.json").read_text())
    raw.update(num_hidden_layers=3, _note="ignored")
    path = tmp_path / "tiny-llama.json"
    path.write_text(json.dumps(raw))
    loaded = load(str(path))
    assert loaded.name == "tiny-llama" and loaded.tokenizer is None
    assert capture(loaded.model).full_kv_bytes_per_token() == 2 * 3 * 8 * 128 * 2


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load 'no-such-model'"):
        load("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load(str(bad))
    nomt = tmp_path / "nomt.json"
    nomt.write_text('{"hidden_size": 8}')
    with pytest.raises(ModelLoadError, match="no 'model_type'"):
        load(str(nomt))
