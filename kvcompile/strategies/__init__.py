"""KV strategies: one frozen dataclass per method, in one explicit registry.

The registry maps a strategy's ``name`` to its class; it is the only way plans are read back
(``from_spec``), so a strategy that is not listed here cannot appear in a plan.
To add a strategy: write the dataclass (cite its paper, exact ``bytes_for``, a ``Store``), add it
to ``REGISTRY`` below, and the parametrized tests in tests/test_strategies*.py cover it.

Storage layouts per head group (B rows, Hg KV heads, head_dim D; ``store.tensors()`` names them;
kernels read exactly these, see each store's docstring):

==================  ======================  =====================================================
strategy            kernel_format()         tensors
==================  ======================  =====================================================
full                full                    k, v [B, Hg, N, D] (storage dtype)
fp8                 fp8                     k, v float8_e4m3fn [B, Hg, N, D]; k_scale, v_scale f32 [B, Hg]
quant (KIVI)        quant                   k_codes, v_codes u8 [B, Hg, Nq, D*bits/8]; k_scale, k_zero f16
                                            [B, Hg, Nq/G, D]; v_scale, v_zero f16 [B, Hg, Nq, D/v_group];
                                            k_res, v_res [B, Hg, Nr, D]
sink_window/snapkv  compact                 k, v [B, Hg, Nk, D]; pos i32 [B, Hg, Nk] (sorted, -1 = empty)
heavy_hitter        compact_scored          compact + score f32 [B, Hg, Nk]
think               think                   k [B, Hg, N, Dk]; k_channels i32 [B, Hg, Dk]; v [B, Hg, N, D]
compose             quant_pos               quant tensors + pos i32 [B, Hg, Nq+Nr]
mikv                mikv                    selector tensors + lo_<quant tensors> + lo_pos
==================  ======================  =====================================================

Left padding: full/fp8/quant/think keep padded slots and mask ``slot < lead[b]``; selection
stores never keep padding (their ``pos`` is -1 in empty slots, so ``pos < lead[b]`` also masks).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from .base import Store, Strategy, reference_attention
from .compose import Compose, MiKV
from .fp8 import FP8
from .full import Full
from .kvzip import KNorm, KVzip
from .paged import Paged
from .quant import Quant
from .selection import HeavyHitter, SinkWindow, SnapKV
from .think import ThinK

REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Full, FP8, Quant, SinkWindow, HeavyHitter, SnapKV, ThinK, Compose, MiKV, Paged)
}
REGISTRY.update({cls.name: cls for cls in (KVzip, KNorm)})  # strategies/kvzip.py (planner issue)
# a serving engine's own cache formats: candidates only when compiling for that engine (kvcompile.engines),
# never in the library grid below
ENGINE_ONLY = frozenset({Paged.name})
# outside the library grid: KVzip needs its scoring prefill (the planner adds it in passes/candidates.py),
# Knorm is a question-agnostic eviction baseline of the frontier benchmark; both tested in tests/test_kvzip.py
OUTSIDE_GRID = frozenset({KVzip.name, KNorm.name})


def from_spec(spec: Mapping[str, Any], _depth: int = 0) -> Strategy:
    """Build a strategy from its plan JSON form ``{"name": ..., **params}``; nested specs allowed.

    Plans come from anywhere, so a spec is checked before any strategy code sees it: keys must be
    the class's fields, each value must have the field's annotated type (``int`` never a bool or a
    float, ``float`` finite, nested strategies as nested specs, at most ``MAX_SPEC_DEPTH`` deep),
    and whatever the constructor or ``check()`` raises becomes a one-line ``ValueError``.
    """
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a strategy spec must be a mapping with a 'name', got {_short(spec)}")
    name = spec["name"]
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown strategy {_short(name)}; registered: {sorted(REGISTRY)}")
    if _depth >= MAX_SPEC_DEPTH:
        raise ValueError(f"strategy {name!r}: specs nested deeper than {MAX_SPEC_DEPTH}")
    cls = REGISTRY[name]
    hints = _field_types(cls)
    params = {}
    for k, v in spec.items():
        if k == "name":
            continue
        if k not in hints:
            raise ValueError(f"strategy {name!r}: unknown parameter {_short(k)}; parameters: {sorted(hints)}")
        params[k] = _param(name, k, hints[k], v, _depth)
    try:
        return cls(**params)
    except ValueError as e:
        raise ValueError(f"strategy {name!r}: {e}") from None
    except Exception as e:  # a check() that trips over odd but well-typed values is still bad input
        raise ValueError(f"strategy {name!r}: bad parameters {_short(params)}: {type(e).__name__}: {e}") from None


MAX_SPEC_DEPTH = 4  # compose(select=..., quant=...) is 2 deep


@functools.cache
def _field_types(cls: type[Strategy]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _param(name: str, key: str, tp: Any, v: Any, depth: int) -> Any:
    """``v`` checked against the field annotation ``tp`` (int, float, str, bool, X | None, a Strategy)."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for t in options:
        if t is type(None) and v is None:
            return None
        if t is bool and isinstance(v, bool):
            return v
        if t is int and isinstance(v, int) and not isinstance(v, bool):
            return v
        if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise ValueError(f"strategy {name!r}: {key}={v!r} must be a finite number")
            return float(v)
        if t is str and isinstance(v, str):
            return v
        if isinstance(t, type) and issubclass(t, Strategy) and isinstance(v, Mapping):
            inner = from_spec(v, depth + 1)
            if not isinstance(inner, t):
                raise ValueError(f"strategy {name!r}: {key}={inner.name!r} is not a {t.__name__} strategy")
            return inner
        if isinstance(t, type) and issubclass(t, Strategy) and isinstance(v, t):
            return v
    want = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ValueError(f"strategy {name!r}: {key}={_short(v)} must be {want}")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


BUDGET_FRACTIONS = (0.5, 0.25, 0.125, 0.06, 0.03)  # token budgets as fractions of the context


def default_instances(context: int) -> list[Strategy]:
    """A candidate grid across every registered strategy, sized for ``context`` tokens.

    Used by the planner (candidates per KV head) and the eval benchmark. Token-selection budgets
    are 50/25/12.5/6/3 % of ``context``; every instance passes ``validate_for(context=context)``
    for head_dim 64.

    >>> [s.label() for s in default_instances(4096)][:3]
    ['full(dtype=bfloat16)', 'fp8(headroom=1.0)', 'quant(bits=8,group=32,residual=32,v_group=None)']
    """
    if context < 64:
        raise ValueError(f"context={context} must be >= 64 for the default grid")
    out: list[Strategy] = [Full(dtype="bfloat16"), FP8()]
    out += [Quant(bits=b, group=32) for b in (8, 4, 2)]
    out += [Quant(bits=kb, group=32, v_bits=vb) for kb, vb in ((8, 4), (4, 2))]  # keys carry the outliers
    budgets = sorted({max(8, int(context * f)) for f in BUDGET_FRACTIONS}, reverse=True)
    for n in budgets:
        out.append(SinkWindow(sinks=4, window=n - 4))
        out.append(HeavyHitter(budget=n, recent=n // 2))
        out.append(SnapKV.keeping(n))
    out += [ThinK(keep_ratio=r) for r in (0.5, 0.25)]
    for n in budgets[:2]:  # selection at 50 % / 25 % of the tokens, then 4- or 2-bit codes
        for bits in (4, 2):
            q = Quant(bits=bits, group=32)
            if n >= q.r + q.group:
                out.append(Compose(select=SnapKV.keeping(n), quant=q))
                out.append(Compose(select=SinkWindow(sinks=4, window=n - 4), quant=q))
    for n in budgets[1:3]:
        out.append(MiKV(select=HeavyHitter(budget=n, recent=n // 2), low_bits=2))
    return out


__all__ = [
    "ENGINE_ONLY",
    "default_instances",
    "OUTSIDE_GRID",
    "REGISTRY",
    "Store",
    "Strategy",
    "from_spec",
    "reference_attention",
    "Compose",
    "FP8",
    "Full",
    "HeavyHitter",
    "KNorm",
    "KVzip",
    "MiKV",
    "Paged",
    "Quant",
    "SinkWindow",
    "SnapKV",
    "ThinK",
]
