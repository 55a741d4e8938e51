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

from collections.abc import Mapping
from typing import Any

from .base import Store, Strategy, reference_attention
from .compose import Compose, MiKV
from .fp8 import FP8
from .full import Full
from .quant import Quant
from .selection import HeavyHitter, SinkWindow, SnapKV
from .think import ThinK

REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Full, FP8, Quant, SinkWindow, HeavyHitter, SnapKV, ThinK, Compose, MiKV)
}


def from_spec(spec: Mapping[str, Any]) -> Strategy:
    """Build a strategy from its plan JSON form ``{"name": ..., **params}``; nested specs allowed."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a strategy spec must be a mapping with a 'name', got {spec!r}")
    name = spec["name"]
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; registered: {sorted(REGISTRY)}")
    nested = lambda v: isinstance(v, Mapping) and "name" in v  # noqa: E731
    params = {k: (from_spec(v) if nested(v) else v) for k, v in spec.items() if k != "name"}
    try:
        return REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"strategy {name!r}: bad parameters {params}: {e}") from None


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
    budgets = sorted({max(8, int(context * f)) for f in BUDGET_FRACTIONS}, reverse=True)
    for n in budgets:
        sinks, obs = 4, min(32, n // 4)
        out.append(SinkWindow(sinks=sinks, window=n - sinks))
        out.append(HeavyHitter(budget=n, recent=n // 2))
        out.append(SnapKV(budget=n - obs, obs_window=obs))
    out += [ThinK(keep_ratio=r) for r in (0.5, 0.25)]
    for n in budgets[:2]:  # selection at 50 % / 25 % of the tokens, then 4- or 2-bit codes
        obs = min(32, n // 4)
        for bits in (4, 2):
            q = Quant(bits=bits, group=32)
            if n >= q.r + q.group:
                out.append(Compose(select=SnapKV(budget=n - obs, obs_window=obs), quant=q))
                out.append(Compose(select=SinkWindow(sinks=4, window=n - 4), quant=q))
    for n in budgets[1:3]:
        out.append(MiKV(select=HeavyHitter(budget=n, recent=n // 2), low_bits=2))
    return out


__all__ = [
    "default_instances",
    "REGISTRY",
    "Store",
    "Strategy",
    "from_spec",
    "reference_attention",
    "Compose",
    "FP8",
    "Full",
    "HeavyHitter",
    "MiKV",
    "Quant",
    "SinkWindow",
    "SnapKV",
    "ThinK",
]
