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
    ``v_group=None`` means KIVI's value groups of ``group`` channels (``head_dim`` when ``group`` does
    not divide it). ``v_bits`` quantizes values with other bits than keys (e.g. K4V2, K8V4: keys
    carry the outliers KIVI quantizes per channel); ``None`` means ``bits``.
    """

    name: ClassVar[str] = "quant"
    paper: ClassVar[str] = (
        "Liu et al. 2024, KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (arXiv:2402.02750)"
    )
    bits: int = 4
    group: int = 32
    residual: int | None = None
    v_group: int | None = None
    v_bits: int | None = None

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
        if self.v_bits is not None:
            check_range("v_bits", self.v_bits, allowed=qr.BITS)

    @property
    def vbits(self) -> int:
        """Bits of the value codes (``v_bits`` resolved)."""
        return self.bits if self.v_bits is None else self.v_bits

    def to_spec(self) -> dict:
        spec = super().to_spec()
        if self.v_bits is None:  # symmetric specs (and plan hashes) read as before v_bits existed
            del spec["v_bits"]
        return spec

    def label(self) -> str:
        base = f"quant(bits={self.bits},group={self.group},residual={self.residual},v_group={self.v_group}"
        return base + ("" if self.v_bits is None else f",v_bits={self.v_bits}") + ")"

    def short_label(self) -> str:
        """``q4/g32`` (+ ``/r<R>`` when the residual is not ``group``, ``/vg<n>`` for value groups)."""
        return f"{self._bits_tag()}/g{self.group}{self._extras()}"

    def _bits_tag(self) -> str:
        return f"q{self.bits}" if self.vbits == self.bits else f"k{self.bits}v{self.vbits}"

    def short_suffix(self) -> str:
        """The part a composition appends: ``q4`` at the default group of 32, else as ``short_label``."""
        return f"{self._bits_tag()}{self._extras()}" if self.group == 32 else self.short_label()

    def _extras(self) -> str:
        r = "" if self.r == self.group else f"/r{self.r}"
        return r + ("" if self.v_group is None else f"/vg{self.v_group}")

    def validate_for(self, *, head_dim: int, context: int | None = None) -> None:
        for name, b in (("bits", self.bits), ("v_bits", self.vbits)):
            if head_dim % (8 // b):
                raise ValueError(f"{name}={b}: head_dim={head_dim} must be divisible by {8 // b} (packing)")
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
        if self.v_group is not None:
            return self.v_group
        return self.group if self.group <= head_dim and head_dim % self.group == 0 else head_dim

    def split(self, tokens: int) -> tuple[int, int]:
        """(quantized, residual) token counts after ``tokens`` tokens."""
        nq = max(0, tokens - self.r) // self.group * self.group
        return nq, tokens - nq

    def quantized_bytes(self, nq: int, head_dim: int) -> int:
        """Bytes of ``nq`` quantized tokens (codes + float16 scales/zeros of K and V)."""
        codes = nq * head_dim * (self.bits + self.vbits) // 8
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
    ``v_codes`` uint8 [B, Hg, Nq, D*v_bits/8], ``v_scale``/``v_zero`` float16 [B, Hg, Nq, D/v_group];
    ``k_res``/``v_res`` [B, Hg, Nr, D] model dtype (the newest tokens, in order after the codes);
    ``pos`` int32 [B, Hg, Nq+Nr] only for compositions (original positions, -1 = empty slot).
    Slot validity: ``pos >= 0`` when ``pos`` is kept, else ``slot >= lead[b]`` (left padding).

    Memory: each of these is a view of a capacity buffer allocated once (first push), sized by
    :meth:`reserve` (the runtime reserves the plan's context) and grown by doubling only if a
    sequence outruns it, so a decode step copies nothing but its own token: codes are written in
    place at flush, the residual is a fixed ``R + G`` slot window shifted left by ``G`` per flush.
    :meth:`nbytes` counts the live views (what ``bytes_for`` predicts); :meth:`reserved_nbytes`
    the allocation.
    """

    NAMES = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")

    def __init__(self, strategy: Quant, head_dim: int, dtype: torch.dtype, with_pos: bool) -> None:
        self.s, self.D, self.dtype, self.with_pos = strategy, head_dim, dtype, with_pos
        self.vg = strategy.vg(head_dim)
        self.lead: torch.Tensor | None = None
        self.nq = 0  # quantized slots
        self.nr = 0  # residual slots
        self._want = 0  # tokens to reserve at the first push
        self._cap: dict[str, torch.Tensor] = {}  # capacity buffers (see class docstring)

    def reserve(self, tokens: int) -> None:
        """Size the capacity buffers for ``tokens`` slots when they are first allocated."""
        self._want = max(self._want, int(tokens))

    # ---- live views ----------------------------------------------------------------------------
    def _view(self, name: str, n: int) -> torch.Tensor | None:
        t = self._cap.get(name)
        return None if t is None else t[:, :, :n]

    k_codes = property(lambda self: self._view("k_codes", self.nq) if self.nq else None)
    v_codes = property(lambda self: self._view("v_codes", self.nq) if self.nq else None)
    k_scale = property(lambda self: self._view("k_scale", self.nq // self.s.group) if self.nq else None)
    k_zero = property(lambda self: self._view("k_zero", self.nq // self.s.group) if self.nq else None)
    v_scale = property(lambda self: self._view("v_scale", self.nq) if self.nq else None)
    v_zero = property(lambda self: self._view("v_zero", self.nq) if self.nq else None)
    k_res = property(lambda self: self._view("k_res", self.nr))
    v_res = property(lambda self: self._view("v_res", self.nr))
    pos = property(lambda self: self._view("pos", self.nq + self.nr))

    @property
    def n(self) -> int:
        return self.nq + self.nr

    def capacity(self, name: str) -> torch.Tensor:
        """The whole capacity buffer ``name`` (kernels read its first slots in place)."""
        return self._cap[name]

    # ---- allocation ----------------------------------------------------------------------------
    def _alloc(self, like: torch.Tensor, q_slots: int, r_slots: int) -> None:
        """(Re)allocate so ``q_slots`` quantized and ``r_slots`` residual slots fit, keeping contents."""
        B, Hg, dev, D, s = like.shape[0], like.shape[1], like.device, self.D, self.s
        G = s.group
        old_q = self._cap["k_codes"].shape[2] if self._cap else -1
        old_r = self._cap["k_res"].shape[2] if self._cap else -1
        want_q = self.s.split(self._want)[0] if self._want else 0
        cap_q = q_slots if q_slots <= old_q else max(q_slots, want_q, 2 * max(old_q, 0))
        cap_q = -(-cap_q // G) * G
        cap_r = max(r_slots, s.r + G) if r_slots > old_r or old_r > 2 * (s.r + G) else old_r
        if cap_q == old_q and cap_r == old_r:
            return
        row, v_row, f16 = D * s.bits // 8, D * s.vbits // 8, torch.float16
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "k_codes": ((cap_q, row), torch.uint8), "v_codes": ((cap_q, v_row), torch.uint8),
            "k_scale": ((cap_q // G, D), f16), "k_zero": ((cap_q // G, D), f16),
            "v_scale": ((cap_q, D // self.vg), f16), "v_zero": ((cap_q, D // self.vg), f16),
            "k_res": ((cap_r, D), self.dtype), "v_res": ((cap_r, D), self.dtype),
        }  # fmt: skip
        if self.with_pos:
            shapes["pos"] = ((cap_q + cap_r,), torch.int32)
        live = {"k_codes": self.nq, "v_codes": self.nq, "k_scale": self.nq // G, "k_zero": self.nq // G,
                "v_scale": self.nq, "v_zero": self.nq, "k_res": self.nr, "v_res": self.nr, "pos": self.n}  # fmt: skip
        cap = {}
        for name, (shape, dtype) in shapes.items():
            t = torch.zeros(B, Hg, *shape, dtype=dtype, device=dev)
            if name == "pos":
                t.fill_(-1)
            if name in self._cap and live[name]:
                t[:, :, : live[name]] = self._cap[name][:, :, : live[name]]
            cap[name] = t
        self._cap = cap

    def reserved_nbytes(self) -> int:
        """Bytes allocated (capacity buffers), >= :meth:`nbytes`."""
        return tensor_bytes(*self._cap.values())

    # ---- writes --------------------------------------------------------------------------------
    def slot_ok(self, start: int, end: int) -> torch.Tensor:
        """[B, Hg or 1, end-start] bool validity of slots ``start..end``."""
        if self.with_pos:
            return self._cap["pos"][:, :, start:end] >= 0
        if self.lead is None:
            raise RuntimeError("KiviBuffer: set lead (or keep pos) before pushing tokens")
        slot = torch.arange(start, end, device=self.lead.device)
        return (slot[None, :] >= self.lead[:, None])[:, None, :]

    def append_residual(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        """Write tokens [B, Hg, T, D] (and their ``pos`` [B, Hg, T]) after the residual, unflushed."""
        if self.with_pos and pos is None:
            raise ValueError("pos: required by a KiviBuffer that keeps positions")
        T = k.shape[2]
        self._alloc(k, self.nq, self.nr + T)
        self._cap["k_res"][:, :, self.nr : self.nr + T] = k
        self._cap["v_res"][:, :, self.nr : self.nr + T] = v
        if pos is not None:
            self._cap["pos"][:, :, self.n : self.n + T] = pos
        self.nr += T

    def pending(self) -> int:
        """Residual tokens due for quantization now (a multiple of ``group``; 0 most steps)."""
        return self.s.split(self.n)[0] - self.nq

    def quantize_ref(self, f: int) -> dict[str, torch.Tensor]:
        """The reference quantization of the oldest ``f`` residual tokens (codes, scales, zeros)."""
        key_ok = self.slot_ok(self.nq, self.nq + f)[..., None]
        kq = qr.quantize_keys(self._cap["k_res"][:, :, :f], self.s.bits, self.s.group, key_ok)
        vq = qr.quantize_values(self._cap["v_res"][:, :, :f], self.s.vbits, self.vg)
        return dict(zip(self.NAMES, kq + vq, strict=True))

    def commit(self, new: dict[str, torch.Tensor], f: int) -> None:
        """Store the quantized oldest ``f`` residual tokens (``new`` as from :meth:`quantize_ref`)."""
        G, nq = self.s.group, self.nq
        self._alloc(self._cap["k_res"], nq + f, self.nr)
        at = {"k_scale": nq // G, "k_zero": nq // G}
        for name, t in new.items():
            a = at.get(name, nq)
            self._cap[name][:, :, a : a + t.shape[2]] = t
        rest = self.nr - f
        for name in ("k_res", "v_res"):
            buf = self._cap[name]
            buf[:, :, :rest] = buf[:, :, f : self.nr].clone()
        self.nq, self.nr = nq + f, rest
        self._alloc(self._cap["k_res"], self.nq, self.nr)  # shrink the residual after a long push

    def push(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        """Append tokens [B, Hg, T, D] (and their ``pos`` [B, Hg, T]) and flush full groups."""
        self.append_residual(k.to(self.dtype), v.to(self.dtype), pos)
        f = self.pending()
        if f > 0:
            self.commit(self.quantize_ref(f), f)

    def dequant(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, V [B, Hg, Nq+Nr, D] in the model dtype, validity [B, Hg or 1, Nq+Nr])."""
        s = self.s
        if not self._cap or self.n == 0:
            raise RuntimeError("KiviBuffer.dequant: nothing pushed yet")
        k_res, v_res = self.k_res, self.v_res
        if self.nq:
            kq = qr.dequantize_keys(self.k_codes, self.k_scale, self.k_zero, s.bits, s.group).to(self.dtype)
            vq = qr.dequantize_values(self.v_codes, self.v_scale, self.v_zero, s.vbits, self.vg).to(self.dtype)
            k, v = torch.cat([kq, k_res], dim=2), torch.cat([vq, v_res], dim=2)
        else:
            k, v = k_res, v_res
        return k, v, self.slot_ok(0, self.n)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = [*self.NAMES, "k_res", "v_res", "pos"]
        out = {n: getattr(self, n) for n in names}
        return {n: t for n, t in out.items() if t is not None}

    def nbytes(self) -> int:
        return tensor_bytes(*self.tensors().values())

    def crop(self, m: int) -> None:
        """Forget the newest ``m`` tokens; only the fp residual can give tokens back (a flushed group's
        scales and zeros were fitted to all its tokens, so it cannot be un-quantized exactly)."""
        if m > self.nr:
            raise NotImplementedError(
                f"KIVI buffer cannot forget {m} tokens: only the {self.nr} newest are unquantized "
                "(a flushed group cannot be un-quantized)"
            )
        if self.with_pos and m:
            self._cap["pos"][:, :, self.n - m : self.n] = -1
        self.nr -= m

    # ---- batch ops (beam search) ---------------------------------------------------------------
    def batch_apply(self, fn) -> None:
        """Apply ``fn`` (a [B, ...] -> [B', ...] row map) to every buffer and the left-padding counts."""
        self._cap = {n: fn(t).contiguous() for n, t in self._cap.items()}
        if self.lead is not None:
            self.lead = fn(self.lead).contiguous()


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

    def reserve(self, context: int) -> None:
        self.buf.reserve(context)

    def crop(self, tokens: int) -> None:
        self.buf.crop(tokens)
        self.tokens_seen -= tokens

    def reserved_nbytes(self) -> int:
        return self.buf.reserved_nbytes()

    def tensors(self):
        return self.buf.tensors()
