"""FP8 (e4m3) KV storage with one scale per KV head, as served by vLLM/TensorRT-LLM fp8 caches."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ._attn import leading_pads
from .base import SlotBuffer, Store, Strategy, check_range, tensor_bytes
from .quant import attend_over

E4M3_MAX = 448.0


@dataclasses.dataclass(frozen=True)
class FP8(Strategy):
    """Store K and V as float8_e4m3fn with a per-KV-head float32 scale each.

    The scale is fixed at the first append (prefill) as ``headroom * absmax / 448`` over that
    prefill's real (non-padding) tokens, so stored values are ``x / scale`` in [-448, 448]. Later
    tokens that exceed the prefill range are clamped to ``±448 * scale`` (saturation, as e4m3 has no
    infinity); ``headroom > 1`` trades resolution for range. Reference: Micikevicius et al.,
    "FP8 Formats for Deep Learning" (arXiv:2209.05433) for e4m3; per-tensor-scaled fp8 KV caches as in
    vLLM's ``kv_cache_dtype="fp8_e4m3"``.
    """

    name: ClassVar[str] = "fp8"
    paper: ClassVar[str] = "Micikevicius et al. 2022, FP8 Formats for Deep Learning (arXiv:2209.05433)"
    headroom: float = 1.0

    def check(self) -> None:
        check_range("headroom", self.headroom, lo=1.0, hi=1e4)

    def short_label(self) -> str:
        return "fp8" if self.headroom == 1.0 else f"fp8:x{self.headroom:g}"

    def bytes_for(self, tokens: int, head_dim: int, dtype_bytes: int) -> int:
        return 2 * tokens * head_dim + (8 if tokens > 0 else 0)  # e4m3 codes + two float32 scales

    def dequant_flops_per_token(self, head_dim: int) -> int:
        return 2 * head_dim * 2  # convert + scale, K and V

    def kernel_format(self) -> str:
        return "fp8"

    def new_store(self, *, batch, num_heads, head_dim, gqa, dtype, device) -> FP8Store:
        return FP8Store(self.headroom, dtype)


class FP8Store(Store):
    """``k``, ``v``: float8_e4m3fn [B, Hg, N, D]; ``k_scale``, ``v_scale``: float32 [B, Hg].

    Dequantization: ``x̂ = float(code) * scale``. Slots before ``lead[b]`` are left padding (masked).
    """

    def __init__(self, headroom: float, dtype: torch.dtype) -> None:
        self.headroom, self.dtype = headroom, dtype
        self.rows = SlotBuffer()  # k, v codes: preallocated for the plan's context (``reserve``)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.lead: torch.Tensor | None = None
        self.tokens_seen = 0

    k = property(lambda self: self.rows.view("k"))
    v = property(lambda self: self.rows.view("v"))

    def reserve(self, context: int) -> None:
        self.rows.reserve(context)

    def reserved_nbytes(self) -> int:
        return self.rows.reserved_nbytes() + tensor_bytes(self.k_scale, self.v_scale)

    def _scale(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        amax = torch.where(valid[:, None, :, None], x.float().abs(), 0.0).amax(dim=(2, 3))
        return torch.where(amax > 0, amax * self.headroom / E4M3_MAX, torch.ones_like(amax))

    def _encode(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        y = x.float() / scale[:, :, None, None]
        return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

    def attend(self, q, k_new, v_new, valid_new, scale):
        stored = None
        if self.k is not None:
            k = (self.k.float() * self.k_scale[:, :, None, None]).to(self.dtype)
            v = (self.v.float() * self.v_scale[:, :, None, None]).to(self.dtype)
            slot = torch.arange(self.k.shape[2], device=k.device)
            stored = (k, v, (slot[None, :] >= self.lead[:, None])[:, None, :])
        return attend_over(stored, q, k_new, v_new, valid_new, scale)

    def append(self, k_new, v_new, q_new, valid_new):
        if self.k is None:
            self.lead = leading_pads(valid_new)
            self.k_scale, self.v_scale = self._scale(k_new, valid_new), self._scale(v_new, valid_new)
        self.rows.append(k=self._encode(k_new, self.k_scale), v=self._encode(v_new, self.v_scale))
        self.tokens_seen += k_new.shape[2]

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v, self.k_scale, self.v_scale)

    def crop(self, tokens: int) -> None:  # scales are fixed at the prefill: dropping codes is exact
        self.rows.crop(tokens)
        self.tokens_seen -= tokens

    def tensors(self):
        names = ("k", "v", "k_scale", "v_scale")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
