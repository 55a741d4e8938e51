"""KIVI: tuning-free asymmetric 2/4/8-bit KV quantization with a full-precision residual window."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from . import _quant_ref as qr
from ._attn import leading_pads, masked_attention
from .base import Store, Strategy, check_range, tensor_bytes


@dataclasses.dataclass(frozen=True)
class Quant(Strategy):
    """KIVI quantization (Liu et al., arXiv:2402.02750): keys per channel over groups of ``group``
    tokens, values per token over groups of ``v_group`` channels, asymmetric (zero = min,
    scale = (max-min)/(2^bits-1), see ``_quant_ref``), codes packed into uint8 along head_dim.

    The newest tokens stay in the model dtype: after ``n`` tokens, ``Nq = floor(max(0, n-R)/G)*G``
    are quantized and ``Nr = n - Nq`` form the residual; when the residual reaches ``R + G`` its
    oldest ``G`` tokens are flushed (quantized). ``residual=None`` means ``R = group``;
    ``v_group=None`` means one value group per token (``v_group = head_dim``).
    """

    name: ClassVar[str] = "quant"
    paper: ClassVar[str] = (
        "Liu et al. 2024, KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (arXiv:2402.02750)"
    )
    bits: int = 4
    group: int = 32
    residual: int | None = None
    v_group: int | None = None

    def __post_init__(self) -> None:
        if self.residual is None:
            object.__setattr__(self, "residual", self.group)
        super().__post_init__()

    def check(self) -> None:
        check_range("bits", self.bits, allowed=qr.BITS)
        check_range("group", self.group, lo=1, hi=1 << 16)
        check_range("residual", self.residual, lo=0, hi=1 << 20)
        if self.v_group is not None:
            check_range("v_group", self.v_group, lo=1, hi=1 << 16)

    def short_label(self) -> str:
        """``q4/g32`` (+ ``/r<R>`` when the residual is not ``group``, ``/vg<n>`` for value groups)."""
        return f"q{self.bits}/g{self.group}{self._extras()}"

    def short_suffix(self) -> str:
        """The part a composition appends: ``q4`` at the default group of 32, else as ``short_label``."""
        return f"q{self.bits}{self._extras()}" if self.group == 32 else self.short_label()

    def _extras(self) -> str:
        r = "" if self.r == self.group else f"/r{self.r}"
        return r + ("" if self.v_group is None else f"/vg{self.v_group}")

    def validate_for(self, *, head_dim: int, context: int | None = None) -> None:
        ppb = 8 // self.bits
        if head_dim % ppb:
            raise ValueError(f"bits={self.bits}: head_dim={head_dim} must be divisible by {ppb} (packing)")
        if head_dim % self.vg(head_dim):
            raise ValueError(f"v_group={self.v_group} must divide head_dim={head_dim}")
        if context is not None and self.r + self.group > context:
            total = self.r + self.group
            raise ValueError(f"residual+group={total} larger than context={context}: nothing is quantized")

    @property
    def r(self) -> int:
        """The residual window R in tokens (``residual`` resolved)."""
        return self.group if self.residual is None else self.residual

    def vg(self, head_dim: int) -> int:
        return self.v_group or head_dim

    def split(self, tokens: int) -> tuple[int, int]:
        """(quantized, residual) token counts after ``tokens`` tokens."""
        nq = max(0, tokens - self.r) // self.group * self.group
        return nq, tokens - nq

    def quantized_bytes(self, nq: int, head_dim: int) -> int:
        """Bytes of ``nq`` quantized tokens (codes + float16 scales/zeros of K and V)."""
        codes = 2 * nq * head_dim * self.bits // 8
        k_meta = (nq // self.group) * head_dim * 2 * 2
        v_meta = nq * (head_dim // self.vg(head_dim)) * 2 * 2
        return codes + k_meta + v_meta

    def bytes_for(self, tokens: int, head_dim: int, dtype_bytes: int) -> int:
        nq, nr = self.split(tokens)
        return self.quantized_bytes(nq, head_dim) + 2 * nr * head_dim * dtype_bytes

    def dequant_flops_per_token(self, head_dim: int) -> int:
        return 2 * head_dim * 4  # K and V: shift, mask, multiply, add per channel

    def kernel_format(self) -> str:
        return "quant"

    def new_store(self, *, batch, num_heads, head_dim, gqa, dtype, device) -> QuantStore:
        self.validate_for(head_dim=head_dim)
        return QuantStore(self, head_dim, dtype)


class KiviBuffer:
    """KIVI storage of a head group; the tensors are the FIXED layout the kernels read.

    ``k_codes`` uint8 [B, Hg, Nq, D*bits/8], ``k_scale``/``k_zero`` float16 [B, Hg, Nq/G, D];
    ``v_codes`` uint8 [B, Hg, Nq, D*bits/8], ``v_scale``/``v_zero`` float16 [B, Hg, Nq, D/v_group];
    ``k_res``/``v_res`` [B, Hg, Nr, D] model dtype (the newest tokens, in order after the codes);
    ``pos`` int32 [B, Hg, Nq+Nr] only for compositions (original positions, -1 = empty slot).
    Slot validity: ``pos >= 0`` when ``pos`` is kept, else ``slot >= lead[b]`` (left padding).
    """

    def __init__(self, strategy: Quant, head_dim: int, dtype: torch.dtype, with_pos: bool) -> None:
        self.s, self.D, self.dtype, self.with_pos = strategy, head_dim, dtype, with_pos
        self.vg = strategy.vg(head_dim)
        self.k_codes = self.k_scale = self.k_zero = None
        self.v_codes = self.v_scale = self.v_zero = None
        self.k_res: torch.Tensor | None = None
        self.v_res: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.lead: torch.Tensor | None = None
        self.nq = 0

    @property
    def n(self) -> int:
        return self.nq + (0 if self.k_res is None else self.k_res.shape[2])

    def slot_ok(self, start: int, end: int) -> torch.Tensor:
        """[B, Hg or 1, end-start] bool validity of slots ``start..end``."""
        if self.pos is not None:
            return self.pos[:, :, start:end] >= 0
        if self.lead is None:
            raise RuntimeError("KiviBuffer: set lead (or keep pos) before pushing tokens")
        slot = torch.arange(start, end, device=self.lead.device)
        return (slot[None, :] >= self.lead[:, None])[:, None, :]

    def push(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        """Append tokens [B, Hg, T, D] (and their ``pos`` [B, Hg, T]) and flush full groups."""
        k, v = k.to(self.dtype), v.to(self.dtype)
        k_res = k if self.k_res is None else torch.cat([self.k_res, k], dim=2)
        v_res = v if self.v_res is None else torch.cat([self.v_res, v], dim=2)
        self.k_res, self.v_res = k_res, v_res
        if self.with_pos:
            if pos is None:
                raise ValueError("pos: required by a KiviBuffer that keeps positions")
            self.pos = pos if self.pos is None else torch.cat([self.pos, pos], dim=2)
        nq, _ = self.s.split(self.n)
        f = nq - self.nq
        if f <= 0:
            return
        s, G = self.s, self.s.group
        key_ok = self.slot_ok(self.nq, nq)[..., None]
        kq = qr.quantize_keys(k_res[:, :, :f], s.bits, G, key_ok)
        vq = qr.quantize_values(v_res[:, :, :f], s.bits, self.vg)
        names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
        for name, t in zip(names, kq + vq, strict=True):
            old = getattr(self, name)
            setattr(self, name, t if old is None else torch.cat([old, t], dim=2))
        self.k_res, self.v_res = k_res[:, :, f:].contiguous(), v_res[:, :, f:].contiguous()
        self.nq = nq

    def dequant(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, V [B, Hg, Nq+Nr, D] in the model dtype, validity [B, Hg or 1, Nq+Nr])."""
        s = self.s
        if self.k_res is None or self.v_res is None:
            raise RuntimeError("KiviBuffer.dequant: nothing pushed yet")
        if self.nq:
            kq = qr.dequantize_keys(self.k_codes, self.k_scale, self.k_zero, s.bits, s.group).to(self.dtype)
            vq = qr.dequantize_values(self.v_codes, self.v_scale, self.v_zero, s.bits, self.vg).to(self.dtype)
            k, v = torch.cat([kq, self.k_res], dim=2), torch.cat([vq, self.v_res], dim=2)
        else:
            k, v = self.k_res, self.v_res
        return k, v, self.slot_ok(0, self.n)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ["k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_res", "pos"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def nbytes(self) -> int:
        return tensor_bytes(*self.tensors().values())


def attend_over(stored: tuple[torch.Tensor, ...] | None, q, k_new, v_new, valid_new, scale) -> torch.Tensor:
    """Attention over stored (K, V, validity) plus the new tokens (full precision, causal)."""
    B, Hg = k_new.shape[0], k_new.shape[1]
    ok_new = valid_new[:, None, :].expand(B, Hg, -1)
    if stored is None or stored[0] is None or stored[0].shape[2] == 0:
        return masked_attention(q, k_new, v_new, ok_new, scale)[0]
    k, v, ok = stored
    key_ok = torch.cat([ok.expand(B, Hg, -1), ok_new], dim=2)
    k_all = torch.cat([k.to(k_new.dtype), k_new], dim=2)
    v_all = torch.cat([v.to(v_new.dtype), v_new], dim=2)
    return masked_attention(q, k_all, v_all, key_ok, scale)[0]


class QuantStore(Store):
    """A :class:`KiviBuffer` with left-padding bookkeeping (``lead``); see the buffer for the layout."""

    def __init__(self, strategy: Quant, head_dim: int, dtype: torch.dtype) -> None:
        self.buf = KiviBuffer(strategy, head_dim, dtype, with_pos=False)
        self.tokens_seen = 0

    def attend(self, q, k_new, v_new, valid_new, scale):
        return attend_over(self.buf.dequant() if self.buf.n else None, q, k_new, v_new, valid_new, scale)

    def append(self, k_new, v_new, q_new, valid_new):
        if self.buf.lead is None:
            self.buf.lead = leading_pads(valid_new)
        self.buf.push(k_new, v_new)
        self.tokens_seen += k_new.shape[2]

    def nbytes(self) -> int:
        return self.buf.nbytes()

    def tensors(self):
        return self.buf.tensors()
