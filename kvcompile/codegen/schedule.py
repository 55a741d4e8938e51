"""The runtime schedule: frozen instruction records per phase, produced by ``codegen.lower`` and
executed by ``runtime/interpreter.py``; and the head grouping both sides share (:func:`group_heads`).

Plain data only (no torch, no triton): a plan can carry its schedule as JSON (``Plan.schedule``) and
:mod:`kvcompile.runtime.interpreter` executes it with ``HANDLERS[instr.op](ctx, instr)``.

Phases, in the order one forward of a layer runs them:

* ``prefill`` — a forward with several new tokens (or the first one): reference attention over the
  store plus the new tokens in full precision (as KIVI/SnapKV/H2O do), then the stores take them;
* ``decode`` — one new token per row: one attention launch for all kernel-served head groups of the
  layer (``group == -1``; a mixed-format launch when they differ), one ``attend_scored`` launch per
  H2O group (attention plus the per-key mass it accumulates), reference attention for the rest, then
  every group takes the token;
* ``flush`` — periodic: a quant group whose residual reached ``residual + group`` tokens quantizes
  its oldest groups (one launch per group);
* ``evict`` — token-selection groups append and evict (their store's reference policy).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ..strategies import Strategy

PHASES = ("prefill", "decode", "flush", "evict")
OPS = ("attend_ref", "append", "push_residual", "attend_decode", "attend_scored", "flush_quant")


@dataclasses.dataclass(frozen=True, slots=True)
class Instr:
    """One step: ``op`` on head group ``group`` of ``layer`` (-1: the layer's kernel-served groups),
    run by kernel ``kernel_uri`` (None: reference only), with extra arguments ``args``."""

    op: str
    phase: str
    layer: int
    group: int
    kernel_uri: str | None = None
    args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op={self.op!r} not allowed; choose one of {list(OPS)}")
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r} not allowed; choose one of {list(PHASES)}")
        # canonical order, so an instruction equals itself after a JSON round trip (sorted keys)
        object.__setattr__(self, "args", tuple(sorted(self.args, key=lambda kv: kv[0])))

    def arg(self, name: str, default: Any = None) -> Any:
        return dict(self.args).get(name, default)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.args}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Instr:
        """One ``Plan.schedule`` row; a malformed row is a ``ValueError`` (loaded plans were already
        compared with the lowering by ``kvcompile.load``; this guards plans built in memory)."""
        try:
            args = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(d.get("args", {})).items())
            return cls(d["op"], d["phase"], d["layer"], d["group"], d.get("kernel_uri"), args)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed schedule row {str(d)[:80]}: {type(e).__name__}: {e}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """All instructions of a plan in execution order, and the kernel keys (uri -> key JSON) they use."""

    instrs: tuple[Instr, ...]
    kernels: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def select(self, phase: str, layer: int | None = None) -> tuple[Instr, ...]:
        """Instructions of ``phase`` (and ``layer``), in order."""
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r} not allowed; choose one of {list(PHASES)}")
        return tuple(i for i in self.instrs if i.phase == phase and (layer is None or i.layer == layer))

    def launches(self, phase: str) -> int:
        """Kernel launches (not counting the split reduce) one execution of ``phase`` performs."""
        return sum(1 for i in self.select(phase) if i.kernel_uri is not None)

    def to_json(self) -> list[dict[str, Any]]:
        """The ``Plan.schedule`` form: one dict per instruction."""
        return [i.to_json() for i in self.instrs]

    @classmethod
    def from_json(cls, rows: list[Mapping[str, Any]], kernels: Mapping[str, Any] | None = None) -> Schedule:
        return cls(tuple(Instr.from_json(r) for r in rows), MappingProxyType(dict(kernels or {})))


@dataclasses.dataclass(frozen=True, slots=True)
class HeadGroup:
    """KV heads of one layer sharing a strategy; ``q_heads`` are the query heads they serve, in order."""

    strategy: Strategy
    kv_heads: tuple[int, ...]
    q_heads: tuple[int, ...]


def group_heads(strategies: Sequence[Strategy], gqa: int) -> tuple[HeadGroup, ...]:
    """Group KV heads by identical strategy spec, in order of first appearance.

    Query head ``j`` reads KV head ``j // gqa``, so a group of KV heads {i, k} serves query heads
    ``[i*gqa, (i+1)*gqa) ∪ [k*gqa, (k+1)*gqa)``.
    """
    order: dict[str, tuple[Strategy, list[int]]] = {}
    for h, s in enumerate(strategies):
        order.setdefault(json.dumps(s.to_spec(), sort_keys=True), (s, []))[1].append(h)
    return tuple(
        HeadGroup(s, tuple(hs), tuple(q for h in hs for q in range(h * gqa, (h + 1) * gqa)))
        for s, hs in order.values()
    )
