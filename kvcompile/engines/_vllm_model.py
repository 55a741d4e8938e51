"""``KVCompileForCausalLM``: vLLM's Llama with each layer's attention rebuilt from a ``.kvplan``.

The plan path comes from the model config (``hf_overrides={"kvcompile_plan": PATH}``, what
``engines.vllm.llm`` / ``kvcompile serve`` pass) or ``$KVCOMPILE_PLAN``; the plan is loaded with
``kvcompile.load`` (hash-verified) and checked (vLLM version, platform, per-layer settings this platform
executes correctly, geometry) before any layer is built, so a bad plan stops vLLM at start-up with one
line. Each layer's ``Attention`` is then re-created under its own layer name with the plan's cache dtype
and sliding window: vLLM derives every layer's KV-cache spec (page size, window) from these objects, so
its allocator, scheduler and CPU_ATTN kernels see the plan without any change to vLLM. A layer with sink
tokens also gets ``_vllm_sinks``' KV spec (its manager keeps the sink blocks) and attention (sinks + window).
"""

from __future__ import annotations

import copy
import os
import types

from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.platforms import current_platform

from ..codegen.check import load
from . import EngineError
from . import _vllm_sinks as sinks
from .vllm import PLAN_ENV, installed_version, layer_settings


def plan_settings(hf_config) -> list[dict]:
    """The plan's per-layer settings after every check that does not need the weights."""
    path = getattr(hf_config, "kvcompile_plan", None) or os.environ.get(PLAN_ENV)
    if not path:
        raise EngineError(f"KVCompileForCausalLM needs a plan: hf_overrides kvcompile_plan=PATH or ${PLAN_ENV}")
    plan = load(path)
    eng = plan.engine or {}
    if eng.get("name") != "vllm":
        raise EngineError(f"{path}: plan was not compiled for vLLM (kvcompile compile MODEL --engine vllm)")
    if eng.get("version") != installed_version():
        raise EngineError(f"{path}: plan was compiled for vLLM {eng.get('version')}, running {installed_version()}")
    platform = "cpu" if current_platform.is_cpu() else "gpu"
    if eng.get("platform") != platform:
        raise EngineError(f"{path}: plan was compiled for vLLM on {eng.get('platform')}, this is {platform}")
    settings = layer_settings(plan, platform)
    site = plan.model.sites[0]
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    got = (hf_config.num_hidden_layers, hf_config.num_key_value_heads, head_dim)
    want = (len(plan.model.sites), site.num_kv_heads, site.head_dim)
    if got != want:
        raise EngineError(f"{path}: plan is for another model: (layers, kv heads, head_dim) {want} != {got}")
    return settings


class KVCompileForCausalLM(LlamaForCausalLM):
    """Llama whose layers' KV caches follow a kvcompile plan (cache dtype and sliding window per layer)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kw) -> None:
        settings = plan_settings(vllm_config.model_config.hf_config)
        if any(st.get("sinks") for st in settings):
            if not current_platform.is_cpu():
                raise EngineError("sink + window layers are implemented for vLLM's CPU_ATTN only")
            sinks.register()
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kw)
        forward_context = vllm_config.compilation_config.static_forward_context
        for layer, setting in zip(self.model.layers, settings, strict=True):
            block = layer.self_attn
            old = block.attn
            cache_config = copy.copy(vllm_config.cache_config)
            cache_config.cache_dtype = setting["kv_cache_dtype"]
            cache_config.kv_cache_dtype_skip_layers = []
            forward_context.pop(old.layer_name)  # the new layer registers under the same name
            block.attn = Attention(
                old.num_heads,
                old.head_size,
                old.impl.scale,
                num_kv_heads=old.num_kv_heads,
                cache_config=cache_config,
                quant_config=None,
                per_layer_sliding_window=setting["sliding_window"],
                prefix=old.layer_name,
            )
            if setting.get("sinks"):
                _with_sinks(block.attn, setting["sinks"])


def _with_sinks(attn: Attention, n: int) -> None:
    """Give ``attn`` the sink KV spec (its blocks ``< n`` are kept) and the sink + window attention."""
    if type(attn.impl) is not sinks.CPUAttentionBackendImpl:
        raise EngineError(f"{attn.layer_name}: sink + window needs CPU_ATTN, vLLM chose {type(attn.impl).__name__}")
    attn.impl.__class__ = sinks.SinkWindowImpl
    attn.impl.sink_tokens = n
    plain = attn.get_kv_cache_spec

    def get_kv_cache_spec(self, vllm_config):
        return sinks.sink_window_spec(plain(vllm_config), n)

    attn.get_kv_cache_spec = types.MethodType(get_kv_cache_spec, attn)
