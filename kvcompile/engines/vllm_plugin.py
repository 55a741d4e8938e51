"""The vLLM general plugin (entry point ``vllm.general_plugins: kvcompile``): registers the model class
that applies a ``.kvplan`` inside every vLLM process. Loading it costs nothing for other models: the class
module (``_vllm_model``) is imported only when a model config names ``KVCompileForCausalLM``.
"""

from __future__ import annotations

from .vllm import ARCH


def register() -> None:
    """Register ``KVCompileForCausalLM`` with vLLM's model registry (idempotent; vLLM may call it often)."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "kvcompile.engines._vllm_model:KVCompileForCausalLM")
