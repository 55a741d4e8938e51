"""KV strategies: one frozen dataclass per method, in one explicit registry.

The registry maps a strategy's ``name`` to its class; it is the only way plans are read back
(``from_spec``), so a strategy that is not listed here cannot appear in a plan.
To add a strategy: write the dataclass (cite its paper, exact ``bytes_for``, a ``Store``), add it
to ``REGISTRY`` below, and the parametrized tests in tests/test_strategies*.py cover it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Store, Strategy, reference_attention
from .fp8 import FP8
from .full import Full
from .quant import Quant
from .selection import HeavyHitter, SinkWindow, SnapKV

REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Full, FP8, Quant, SinkWindow, HeavyHitter, SnapKV)
}


def from_spec(spec: Mapping[str, Any]) -> Strategy:
    """Build a strategy from its plan JSON form ``{"name": ..., **params}``; nested specs allowed."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a strategy spec must be a mapping with a 'name', got {spec!r}")
    name = spec["name"]
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; registered: {sorted(REGISTRY)}")
    params = {
        k: (from_spec(v) if isinstance(v, Mapping) and "name" in v else v) for k, v in spec.items() if k != "name"
    }
    try:
        return REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"strategy {name!r}: bad parameters {params}: {e}") from None


__all__ = [
    "REGISTRY",
    "Store",
    "Strategy",
    "from_spec",
    "reference_attention",
    "FP8",
    "Full",
    "HeavyHitter",
    "Quant",
    "SinkWindow",
    "SnapKV",
]
