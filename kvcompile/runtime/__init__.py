"""The runtime: a transformers Cache built from a plan, used by ``model.generate``.

``make_cache(plan, model)`` checks the plan against the model (``validate.py``), switches the model to
the ``"kvcompile"`` attention function (``attention.py``) and returns a :class:`KVCompileCache`
(``cache.py``) whose layers hold one strategy store per head group. Plans can be built without the
compiler with ``uniform_plan`` / ``mixed_plan`` (``builders.py``).

This package never imports the compiler (passes, solve, capture): serving code loads a plan
without it.

Example
-------
>>> from kvcompile.models import load                                    # doctest: +SKIP
>>> m = load("smollm2-135m")                                            # doctest: +SKIP
>>> plan = uniform_plan(m.model, {"name": "full"}, context=4096)        # doctest: +SKIP
>>> cache = make_cache(plan, m.model)                                    # doctest: +SKIP
>>> m.model.generate(ids, cache=cache, max_new_tokens=20)     # doctest: +SKIP
>>> cache.nbytes() == plan.predicted_kv_bytes(cache.get_seq_length())   # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any

from ..plan import Plan, PlanError
from .attention import ATTN_IMPLEMENTATION, BACKENDS, kvcompile_attention, register
from .builders import hf_model, mixed_plan, plan_for, uniform_plan
from .cache import HeadGroup, KVCompileCache, KVCompileLayer, PlanWarning
from .interpreter import attach
from .validate import Geometry, check_plan, model_geometry


def make_cache(plan: Plan, model: Any, *, backend: str = "torch", strict: bool = False) -> KVCompileCache:
    """Check ``plan`` against ``model`` and return an empty :class:`KVCompileCache` for it.

    Raises :class:`~kvcompile.plan.PlanError` (a ValueError) before any generation when the plan does
    not fit: layer count, KV/query head counts or head_dim differ from ``model.config``, or a strategy
    rejects the site/context (``Strategy.validate_for``). A fingerprint or dtype mismatch is a
    :class:`PlanWarning` (and ``cache.notes``), or a PlanError with ``strict=True``.

    Side effect: registers the ``"kvcompile"`` attention function with transformers and calls
    ``model.set_attn_implementation("kvcompile")``. Without a KVCompileCache the model then runs
    transformers' sdpa path unchanged. ``cache.previous_attn_implementation`` records the old setting.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} not available; choose one of {list(BACKENDS)}")
    model = hf_model(model)
    strategies, notes = check_plan(plan, model, strict=strict)
    for note in notes:
        warnings.warn(note, PlanWarning, stacklevel=2)
    geo = model_geometry(model)
    previous = model.config._attn_implementation
    register()
    if previous != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise PlanError(
                f"{type(model).__name__} cannot switch its attention implementation to "
                f"{ATTN_IMPLEMENTATION!r} (it does not use transformers' AttentionInterface)"
            )
    cache = KVCompileCache(strategies, head_dim=geo.head_dim, gqa=geo.gqa, backend=backend, notes=notes,
                           context=plan.config.context)  # fmt: skip
    cache.previous_attn_implementation = previous
    attach(cache, plan=plan)  # the plan's schedule (lowered once, here) and its hash-checked kernels
    return cache


Plan.make_cache.builder = make_cache  # type: ignore[attr-defined]  # the plan's import-free alias


__all__ = [
    "ATTN_IMPLEMENTATION",
    "BACKENDS",
    "Geometry",
    "HeadGroup",
    "KVCompileCache",
    "KVCompileLayer",
    "PlanWarning",
    "check_plan",
    "kvcompile_attention",
    "make_cache",
    "mixed_plan",
    "model_geometry",
    "plan_for",
    "register",
    "uniform_plan",
]
