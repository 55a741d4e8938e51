"""Compositions: token selection + KIVI quantization, and MiKV's mixed-precision eviction.

Both are wrappers holding two frozen sub-strategies (nested specs in plans:
``{"name": "compose", "select": {...}, "quant": {...}}``); neither mutates its parts.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ._select import Selection, SelectStore
from .base import Store, Strategy, check_range
from .quant import KiviBuffer, Quant, attend_over
from .selection import HeavyHitter, SnapKV

POS_BYTES = 4  # int32 original position per stored token


def _check_select(select: object, who: str) -> None:
    if not isinstance(select, Selection):
        raise ValueError(f"{who}: select={select!r} must be a token-selection strategy (sink_window, ...)")


@dataclasses.dataclass(frozen=True)
class Compose(Strategy):
    """Tokens that survive ``select`` are stored KIVI-quantized by ``quant`` (e.g. SnapKV + 2-bit,
    as combined in the SnapKV and KIVI evaluations), plus their positions.

    The selector compresses the prefill exactly as on its own; the survivors, in position order,
    then enter a KIVI buffer (layout of ``quant.KiviBuffer`` with ``pos`` int32 [B, Hg, N], -1 =
    empty slot) and every later token is appended (quantized by the residual flush), i.e. the
    selection is prefill-time (the SnapKV regime) for every selector: evicting single tokens
    from a quantized key group would break KIVI's per-channel groups. ``bytes_for(n)`` is the
    size after a prefill of ``n`` tokens; ``bytes_for_seq`` adds decode tokens.
    """

    name: ClassVar[str] = "compose"
    paper: ClassVar[str] = "token selection (see select) + KIVI, Liu et al. 2024 (arXiv:2402.02750)"
    select: Selection = dataclasses.field(default_factory=SnapKV)
    quant: Quant = dataclasses.field(default_factory=Quant)

    def check(self) -> None:
        _check_select(self.select, "compose")
        if not isinstance(self.quant, Quant):
            raise ValueError(f"compose: quant={self.quant!r} must be a quant strategy")
        if isinstance(self.select, SnapKV) and self.select.decode_window is not None:
            raise ValueError("compose: select.decode_window is not supported (selection is prefill-time)")
        if self.quant.r + self.quant.group > self.select.cap():
            raise ValueError(
                f"compose: quant residual+group={self.quant.r + self.quant.group} larger than the "
                f"select budget {self.select.cap()} (nothing would be quantized)"
            )

    def validate_for(self, *, head_dim: int, context: int | None = None) -> None:
        self.select.validate_for(head_dim=head_dim, context=context)
        self.quant.validate_for(head_dim=head_dim)

    def short_label(self) -> str:
        return f"{self.select.short_label()}+{self.quant.short_suffix()}"

    def _bytes(self, kept: int, head_dim: int, dtype_bytes: int) -> int:
        return self.quant.bytes_for(kept, head_dim, dtype_bytes) + POS_BYTES * kept

    def bytes_for(self, tokens: int, head_dim: int, dtype_bytes: int) -> int:
        return self._bytes(self.select.kept(tokens), head_dim, dtype_bytes)

    def bytes_for_seq(self, prefill: int, decoded: int, head_dim: int, dtype_bytes: int) -> int:
        return self._bytes(self.select.kept(prefill) + decoded, head_dim, dtype_bytes)

    def dequant_flops_per_token(self, head_dim: int) -> int:
        return self.quant.dequant_flops_per_token(head_dim)

    def kernel_format(self) -> str:
        return "quant_pos"

    def new_store(self, *, batch, num_heads, head_dim, gqa, dtype, device) -> ComposeStore:
        self.quant.validate_for(head_dim=head_dim)
        return ComposeStore(self, head_dim, dtype)


class ComposeStore(Store):
    """Prefill through a temporary :class:`SelectStore`, then a :class:`KiviBuffer` with ``pos``."""

    def __init__(self, strategy: Compose, head_dim: int, dtype: torch.dtype) -> None:
        self.sel: SelectStore | None = SelectStore(strategy.select, dtype)
        self.buf = KiviBuffer(strategy.quant, head_dim, dtype, with_pos=True)
        self.tokens_seen = 0
        self.context: int | None = None

    def reserve(self, context: int) -> None:
        self.context = context  # capacity is sized at the prefill: kept(prefill) + later tokens

    def crop(self, tokens: int) -> None:
        if self.sel is not None:
            raise NotImplementedError("compose: nothing to crop before the prefill")
        self.buf.crop(tokens)
        self.tokens_seen -= tokens

    def attend(self, q, k_new, v_new, valid_new, scale):
        if self.sel is not None:
            return self.sel.attend(q, k_new, v_new, valid_new, scale)
        return attend_over(self.buf.dequant() if self.buf.n else None, q, k_new, v_new, valid_new, scale)

    def append(self, k_new, v_new, q_new, valid_new):
        B, Hg, T = k_new.shape[:3]
        if self.sel is not None:
            self.sel.append(k_new, v_new, q_new, valid_new)
            if self.context is not None:
                self.buf.reserve(self.sel.k.shape[2] + max(0, self.context - T))
            self.buf.push(self.sel.k, self.sel.v, self.sel.pos)
            self.sel = None
        else:
            pos = torch.arange(self.tokens_seen, self.tokens_seen + T, dtype=torch.int32, device=k_new.device)
            pos = torch.where(valid_new, pos, -1)[:, None, :].expand(B, Hg, T).contiguous()
            self.buf.push(k_new, v_new, pos)
        self.tokens_seen += T

    def nbytes(self) -> int:
        return self.buf.nbytes()

    def reserved_nbytes(self) -> int:
        return self.buf.reserved_nbytes()

    def tensors(self):
        return self.buf.tensors()


@dataclasses.dataclass(frozen=True)
class MiKV(Strategy):
    """MiKV (Yang et al., arXiv:2402.18096, "No Token Left Behind"): tokens the selector ``select``
    would evict are kept at ``low_bits`` in a KIVI store (groups of ``group``, no residual window)
    instead of being dropped; the selected (important) tokens stay in the model dtype. The paper
    also stores the important tokens at moderate precision; here they are full precision.

    Layout: the selector's tensors (``k``, ``v``, ``pos`` [, ``score``]) plus ``lo_*`` = a
    :class:`KiviBuffer` with ``pos`` holding evicted tokens in eviction order (-1 = empty slot).
    """

    name: ClassVar[str] = "mikv"
    paper: ClassVar[str] = (
        "Yang et al. 2024, No Token Left Behind: Reliable KV Cache Compression via Importance-Aware "
        "Mixed Precision Quantization (arXiv:2402.18096)"
    )
    select: Selection = dataclasses.field(default_factory=HeavyHitter)
    low_bits: int = 2
    group: int = 32

    def check(self) -> None:
        _check_select(self.select, "mikv")
        check_range("low_bits", self.low_bits, allowed=(8, 4, 2))
        check_range("group", self.group, lo=1, hi=1 << 16)

    def short_label(self) -> str:
        g = "" if self.group == 32 else f"/g{self.group}"
        return f"mikv({self.select.short_label()},lo{self.low_bits}{g})"

    def low(self) -> Quant:
        """The quantizer of evicted tokens."""
        return Quant(bits=self.low_bits, group=self.group, residual=0)

    def validate_for(self, *, head_dim: int, context: int | None = None) -> None:
        self.select.validate_for(head_dim=head_dim, context=context)
        self.low().validate_for(head_dim=head_dim)

    def _bytes(self, hi_bytes: int, evicted: int, head_dim: int, dtype_bytes: int) -> int:
        return hi_bytes + self.low().bytes_for(evicted, head_dim, dtype_bytes) + POS_BYTES * evicted

    def bytes_for(self, tokens: int, head_dim: int, dtype_bytes: int) -> int:
        hi = self.select.bytes_for(tokens, head_dim, dtype_bytes)
        return self._bytes(hi, tokens - self.select.kept(tokens), head_dim, dtype_bytes)

    def bytes_for_seq(self, prefill: int, decoded: int, head_dim: int, dtype_bytes: int) -> int:
        hi = self.select.bytes_for_seq(prefill, decoded, head_dim, dtype_bytes)
        evicted = prefill + decoded - self.select.kept_seq(prefill, decoded)
        return self._bytes(hi, evicted, head_dim, dtype_bytes)

    def dequant_flops_per_token(self, head_dim: int) -> int:
        return self.low().dequant_flops_per_token(head_dim)

    def kernel_format(self) -> str:
        return "mikv"

    def new_store(self, *, batch, num_heads, head_dim, gqa, dtype, device) -> MiKVStore:
        self.low().validate_for(head_dim=head_dim)
        return MiKVStore(self, head_dim, dtype)


class MiKVStore(Store):
    """A selector store (important tokens, full precision) + a low-bit KIVI buffer of the evicted."""

    def __init__(self, strategy: MiKV, head_dim: int, dtype: torch.dtype) -> None:
        self.hi = SelectStore(strategy.select, dtype)
        self.hi.collect_evicted = True
        self.lo = KiviBuffer(strategy.low(), head_dim, dtype, with_pos=True)
        self.tokens_seen = 0

    def attend(self, q, k_new, v_new, valid_new, scale):
        low = self.lo.dequant() if self.lo.n else None
        return self.hi.attend_with(low, q, k_new, v_new, valid_new, scale)

    def append(self, k_new, v_new, q_new, valid_new):
        self.hi.append(k_new, v_new, q_new, valid_new)
        if self.hi.evicted is not None:
            self.lo.push(*self.hi.evicted)
        self.tokens_seen = self.hi.tokens_seen

    def nbytes(self) -> int:
        return self.hi.nbytes() + self.lo.nbytes()

    def reserved_nbytes(self) -> int:
        return self.hi.nbytes() + self.lo.reserved_nbytes()

    def crop(self, tokens: int) -> None:
        raise NotImplementedError("mikv cannot forget tokens: evictions already moved tokens to its low-bit store")

    def tensors(self):
        return {**self.hi.tensors(), **{f"lo_{n}": t for n, t in self.lo.tensors().items()}}
