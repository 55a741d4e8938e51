"""``KernelKey``: everything a rendered kernel is specialized on, with a readable ``uri()``.

Kinds: ``decode_full`` / ``decode_fp8`` / ``decode_compact`` / ``decode_quant`` (one format per
launch), ``decode_mixed`` (one launch per layer over several formats; ``slots`` lists them) and
``quant_append`` (the KIVI flush). Uris read like flashinfer's, e.g.
``decode_quant_hd64_b4_g32_gqa3_r32_f32``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from .formats import FORMATS

KINDS = (
    "decode_full",
    "decode_fp8",
    "decode_compact",
    "decode_compact_scored",
    "decode_quant",
    "decode_mixed",
    "quant_append",
)
DTYPE_TAGS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# strategy kernel formats served by kernels; any other format runs its store's torch reference
KERNEL_FORMATS = tuple(FORMATS)
QUANT_FORMATS = tuple(n for n, f in FORMATS.items() if f.quant)  # slots carrying KIVI parameters
MIXED_ONLY = tuple(n for n, f in FORMATS.items() if f.uniform_kind is None)  # the mixed launch even alone


@dataclasses.dataclass(frozen=True, slots=True)
class Slot:
    """One format inside a mixed launch (``bits``/``group``/``v_group``/``residual`` only for quant)."""

    fmt: str
    bits: int = 0
    group: int = 0
    v_group: int = 0
    residual: int = 0
    v_bits: int = 0  # value-code bits when they differ from ``bits`` (0: the same)

    def __post_init__(self) -> None:
        if self.fmt not in KERNEL_FORMATS:
            raise ValueError(f"fmt={self.fmt!r} has no kernel; kernel formats: {list(KERNEL_FORMATS)}")

    def tag(self) -> str:
        if self.fmt not in QUANT_FORMATS:
            return self.fmt
        prefix = {"quant": "q", "quant_pos": "qp", "mikv": "mikv"}[self.fmt]
        vb = f"x{self.v_bits}" if self.v_bits else ""
        return f"{prefix}{self.bits}{vb}g{self.group}v{self.v_group}r{self.residual}"


@dataclasses.dataclass(frozen=True, slots=True)
class KernelKey:
    """Specialization of one kernel. ``block_n`` 0 = chosen at launch by the settings heuristic."""

    kind: str
    head_dim: int
    gqa: int = 1
    dtype: str = "float32"
    bits: int = 0
    group: int = 0
    v_group: int = 0
    residual: int = 0
    block_n: int = 0
    slots: tuple[Slot, ...] = ()
    v_bits: int = 0  # value-code bits when they differ from ``bits`` (0: the same)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} not allowed; choose one of {list(KINDS)}")
        if self.dtype not in DTYPE_TAGS:
            raise ValueError(f"dtype={self.dtype!r} not allowed; choose one of {list(DTYPE_TAGS)}")
        if self.head_dim <= 0 or self.gqa <= 0:
            raise ValueError(f"head_dim={self.head_dim} and gqa={self.gqa} must be positive")
        if (self.kind in ("decode_quant", "quant_append")) != (self.bits in (2, 4, 8)):
            raise ValueError(f"bits={self.bits}: quant kernels need 2/4/8, other kinds 0")
        if (self.kind == "decode_mixed") != bool(self.slots):
            raise ValueError("slots: required for (and only for) kind='decode_mixed'")

    def uri(self) -> str:
        """Readable, filesystem-safe id, e.g. ``decode_quant_hd64_b4_g32_gqa3_r32_f32``."""
        parts = [self.kind, f"hd{self.head_dim}"]
        if self.bits:
            parts += [f"b{self.bits}", f"g{self.group}"]
            if self.v_group and self.v_group != self.head_dim:
                parts.append(f"vg{self.v_group}")
            if self.v_bits:
                parts.append(f"vb{self.v_bits}")
        if self.kind != "quant_append":
            parts.append(f"gqa{self.gqa}")
        if self.kind == "decode_quant":
            parts.append(f"r{self.residual}")
        if self.slots:
            parts.append("s-" + "-".join(s.tag() for s in self.slots))
        if self.block_n:
            parts.append(f"bn{self.block_n}")
        parts.append(DTYPE_TAGS[self.dtype])
        uri = "_".join(parts)
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", uri):
            raise ValueError(f"uri {uri!r} is not filesystem-safe")
        return uri

    def to_json(self) -> dict[str, Any]:
        """JSON form (stored in plans next to the source)."""
        d = dataclasses.asdict(self)
        d["slots"] = [dataclasses.asdict(s) for s in self.slots]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KernelKey:
        return cls(**{**d, "slots": tuple(Slot(**s) for s in d.get("slots", ()))})


def slot_for(strategy: Any, head_dim: int) -> Slot | None:
    """The kernel slot serving a strategy's storage, or None when only its torch reference can."""
    fmt = strategy.kernel_format()
    if fmt not in KERNEL_FORMATS:
        return None
    if fmt == "quant":
        vb = strategy.vbits if strategy.vbits != strategy.bits else 0
        return Slot("quant", strategy.bits, strategy.group, strategy.vg(head_dim), strategy.residual, vb)
    if fmt == "mikv" and strategy.select.observe == "all":
        return None  # an H2O selector needs every step's attention mass: its store's reference serves it
    if fmt in ("quant_pos", "mikv"):
        quant = strategy.quant if fmt == "quant_pos" else strategy.low()
        vb = quant.vbits if quant.vbits != quant.bits else 0
        return Slot(fmt, quant.bits, quant.group, quant.vg(head_dim), quant.r, vb)
    return Slot(fmt)


def decode_key(slots: tuple[Slot, ...], head_dim: int, gqa: int, dtype: str) -> KernelKey:
    """The decode key of a layer whose kernel-served groups have ``slots`` (one slot: a uniform kernel)."""
    if len(slots) == 1 and slots[0].fmt not in MIXED_ONLY:
        s = slots[0]
        kind = FORMATS[s.fmt].uniform_kind or "decode_mixed"
        return KernelKey(kind, head_dim, gqa, dtype, s.bits, s.group, s.v_group, s.residual, v_bits=s.v_bits)
    return KernelKey("decode_mixed", head_dim, gqa, dtype, slots=slots)


def scored_key(head_dim: int, gqa: int, dtype: str) -> KernelKey:
    """The key of compacted decode that also returns per-key attention mass (H2O's ``compact_scored``)."""
    return KernelKey("decode_compact_scored", head_dim, gqa, dtype)


def append_key(slot: Slot, head_dim: int, dtype: str) -> KernelKey:
    """The flush key of a quant slot."""
    return KernelKey("quant_append", head_dim, 1, dtype, slot.bits, slot.group, slot.v_group, v_bits=slot.v_bits)
