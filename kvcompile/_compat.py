"""The one place that knows which keyword a transformers model takes for its KV cache.

transformers 5.24 renamed ``past_key_values=`` to ``cache=`` (``past_key_values`` is removed from
``forward`` in 5.40); vLLM 0.32 pins transformers < 5.20, which only knows ``past_key_values``.
Project code passes caches as ``model(ids, **cache_kw(cache))`` / ``model.generate(..., **cache_kw(cache))``
so it runs warning-free on every transformers version in ``pyproject.toml``'s bound.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=1)
def cache_keyword() -> str:
    """``"cache"`` when the installed transformers' Llama ``forward`` takes it, else ``"past_key_values"``."""
    from transformers import LlamaForCausalLM

    params = inspect.signature(LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kw(cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a model call or ``generate``."""
    return {cache_keyword(): cache}
