"""A serving engine's paged KV layer: every token (or a sliding window) in bf16 or fp8 with a fixed scale.

This is what vLLM's attention backends store per layer (``kv_cache_dtype`` + the layer's
``sliding_window``), emulated exactly enough to calibrate and verify plans that vLLM will execute
(``kvcompile.engines.vllm``):

* ``kv_dtype="fp8_e4m3"``: ``code = e4m3_trunc(bf16(x) / scale)`` with one per-tensor scale per layer
  and K/V (vLLM's ``layer._k_scale`` / ``_v_scale``; 1.0 unless the checkpoint ships scales), read back as
  ``code * scale``. vLLM's CPU cache write rounds toward zero (the bf16 value's mantissa cut to 3 bits,
  saturating at ±448): measured against vLLM 0.32's prompt logprobs (SmolLM2, 300 tokens, all layers fp8)
  this is 0.029 nats/token away from vLLM where round-to-nearest-even is 0.064 (bf16 cache: 0.016).
  Unlike kvcompile's own ``fp8`` (a per-head scale fixed from the prefill), the scale is a plan
  constant, so nothing but the codes is stored.
* The engine writes the new tokens into the cache *before* attending (reshape_and_cache, then paged
  attention over the cache), so prefill queries also read quantized keys; the store does the same.
* ``window=W``: query at position ``i`` attends keys ``j`` with ``i - W < j <= i`` during prefill and
  decode alike (vLLM / transformers sliding-window semantics); the store keeps the last
  ``W - 1`` tokens, all any later query can see, or ``reserve`` tokens when set: what the engine really
  holds per sequence for the layer (vLLM keeps ``W - 1`` plus the tokens in flight, rounded up to whole
  blocks), so the planner's byte budget is the engine's memory. Tokens beyond the window stay masked.
* ``sinks=S`` (with a window; StreamingLLM, Xiao et al. 2023): the first ``S`` tokens stay visible to every
  query, mask ``j < S or i - W < j <= i``; the store keeps them besides the window (kvcompile's vLLM plugin
  keeps the blocks covering them and attends them with the window, ``engines/_vllm_model.py``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ._attn import leading_pads
from .base import Store, Strategy, check_range, tensor_bytes

E4M3_MAX = 448.0
KV_DTYPES = {"bfloat16": 2, "fp8_e4m3": 1}


@dataclasses.dataclass(frozen=True)
class Paged(Strategy):
    """One layer of a paged serving cache: ``kv_dtype`` storage, optional sliding ``window``.

    Parameters: ``kv_dtype`` in ``KV_DTYPES``; ``window`` (>= 2 tokens, or None for every token);
    ``k_scale`` / ``v_scale``: the fixed per-tensor fp8 scales (ignored for bfloat16); ``reserve``: tokens
    held per sequence by a windowed layer (at least window - 1, which is also the default).
    """

    name: ClassVar[str] = "paged"
    paper: ClassVar[str] = (
        "Kwon et al. 2023, Efficient Memory Management for LLM Serving with PagedAttention (arXiv:2309.06180); "
        "sliding window: Beltagy et al. 2020 (arXiv:2004.05150)"
    )
    observe: ClassVar[str] = "none"  # nothing the store keeps depends on attention scores
    kv_dtype: str = "bfloat16"
    window: int | None = None
    k_scale: float = 1.0
    v_scale: float = 1.0
    reserve: int | None = None
    sinks: int = 0

    def check(self) -> None:
        check_range("kv_dtype", self.kv_dtype, allowed=tuple(KV_DTYPES))
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, int):
                raise ValueError(f"window={self.window!r} must be an int number of tokens or None")
            check_range("window", self.window, lo=2, hi=1 << 24)
        if self.reserve is not None:
            if self.window is None:
                raise ValueError("reserve is only meaningful with a window (a full layer holds every token)")
            check_range("reserve", self.reserve, lo=1, hi=1 << 24)
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int):
            raise ValueError(f"sinks={self.sinks!r} must be an int number of tokens")
        check_range("sinks", self.sinks, lo=0, hi=1 << 16)
        if self.sinks and self.window is None:
            raise ValueError("sinks are only meaningful with a window (a full layer sees every token)")
        check_range("k_scale", self.k_scale, lo=1e-8, hi=1e8)
        check_range("v_scale", self.v_scale, lo=1e-8, hi=1e8)

    def short_label(self) -> str:
        dt = "bf16" if self.kv_dtype == "bfloat16" else "fp8"
        if self.window is None:
            return dt
        return f"{dt}+sink{self.sinks}+win{self.window}" if self.sinks else f"{dt}+win{self.window}"

    def kept(self, tokens: int) -> int:
        """Tokens held after ``tokens`` tokens."""
        if self.window is None:
            return tokens
        return min(tokens, max(self.sinks + self.window - 1, self.reserve or 0))

    def bytes_for(self, tokens: int, head_dim: int, dtype_bytes: int) -> int:
        return 2 * self.kept(tokens) * head_dim * KV_DTYPES[self.kv_dtype]

    def dequant_flops_per_token(self, head_dim: int) -> int:
        return 0 if self.kv_dtype == "bfloat16" else 2 * head_dim * 2

    def kernel_format(self) -> str:
        # distinct per setting: with max_kernels_per_layer=1 the solve gives every head of a layer one setting
        return f"paged:{self.kv_dtype}:{self.window or 0}" + (f":s{self.sinks}" if self.sinks else "")

    def new_store(self, *, batch, num_heads, head_dim, gqa, dtype, device) -> PagedStore:
        return PagedStore(self, dtype)


def e4m3_truncate(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded toward zero onto the e4m3 grid (3 mantissa bits, subnormal step 2^-9),
    saturated at ±448; every result is exactly representable in ``float8_e4m3fn``."""
    a = x.abs().clamp(max=E4M3_MAX)
    step = torch.exp2(torch.floor(torch.log2(a.clamp(min=2.0**-6))) - 3)  # ulp of the binade (>= 2^-9)
    return torch.sign(x) * torch.floor(a / step) * step


class PagedStore(Store):
    """``k``, ``v``: [B, Hg, N, D] in bfloat16 or float8_e4m3fn (codes of ``x / scale``); N <= window - 1.

    ``lead[b]`` left-padding slots of row b are masked; ``pos[s]`` is the position of stored slot ``s``: the
    first ``sinks`` positions (when kept), then the most recent tokens.
    """

    def __init__(self, strategy: Paged, dtype: torch.dtype) -> None:
        self.s, self.dtype = strategy, dtype
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.lead: torch.Tensor | None = None
        self.tokens_seen = 0
        self.pos: torch.Tensor | None = None  # [N] positions of the stored slots

    def _encode(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if self.s.kv_dtype == "bfloat16":
            return x.to(torch.bfloat16)
        return e4m3_truncate(x.to(torch.bfloat16).float() / scale).to(torch.float8_e4m3fn)  # exact: on the grid

    def _decode(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if self.s.kv_dtype == "bfloat16":
            return x.to(self.dtype)
        return (x.float() * scale).to(self.dtype)

    def attend(self, q, k_new, v_new, valid_new, scale):
        T = q.shape[2]
        lead = self.lead if self.lead is not None else leading_pads(valid_new)
        # the engine stores first, then attends over the cache: new tokens are read back quantized too
        k_new = self._decode(self._encode(k_new, self.s.k_scale), self.s.k_scale)
        v_new = self._decode(self._encode(v_new, self.s.v_scale), self.s.v_scale)
        if self.k is not None:
            k = torch.cat([self._decode(self.k, self.s.k_scale), k_new.to(self.dtype)], dim=2)
            v = torch.cat([self._decode(self.v, self.s.v_scale), v_new.to(self.dtype)], dim=2)
        else:
            k, v = k_new.to(self.dtype), v_new.to(self.dtype)
        N = k.shape[2]
        qpos = torch.arange(self.tokens_seen, self.tokens_seen + T, device=q.device)
        pos = qpos if self.pos is None else torch.cat([self.pos.to(q.device), qpos])  # [N] slots
        allowed = (pos[None, :] <= qpos[:, None])[None]  # [1 or B, T, N]
        if self.s.window is not None:
            # sinks are a row's first real tokens (after its left padding)
            sink = (pos[None, :] - lead[:, None]) < self.s.sinks  # [B, N]
            allowed = allowed & ((pos[None, :] > qpos[:, None] - self.s.window)[None] | sink[:, None, :])
        key_ok = pos[None, :] >= lead[:, None]  # [B, N]
        key_ok[:, N - T :] &= valid_new
        mask = allowed[:, None] & key_ok[:, None, None, :]
        own = pos[None, :] == qpos[:, None]  # padding queries see no key: give them their own slot
        mask = mask | (~mask.any(-1, keepdim=True) & own)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )

    def append(self, k_new, v_new, q_new, valid_new):
        if self.lead is None:
            self.lead = leading_pads(valid_new)
        k8, v8 = self._encode(k_new, self.s.k_scale), self._encode(v_new, self.s.v_scale)
        self.k = k8 if self.k is None else torch.cat([self.k, k8], dim=2)
        self.v = v8 if self.v is None else torch.cat([self.v, v8], dim=2)
        new_pos = torch.arange(self.tokens_seen, self.tokens_seen + k_new.shape[2], device=k_new.device)
        self.pos = new_pos if self.pos is None else torch.cat([self.pos, new_pos])
        self.tokens_seen += k_new.shape[2]
        keep = self.s.kept(self.tokens_seen)
        if self.k.shape[2] > keep:
            # the sink slots (positions < sinks) stay; the rest keeps the most recent tokens
            lead_max = int(self.lead.max()) if self.s.sinks and self.lead.numel() else 0
            n_sink = int((self.pos < self.s.sinks + lead_max).sum()) if self.s.sinks else 0
            n = self.k.shape[2]
            recent = max(keep - n_sink, (self.s.window or 2) - 1)
            dev = self.k.device
            idx = torch.cat([torch.arange(n_sink, device=dev), torch.arange(n - recent, n, device=dev)])
            self.k, self.v, self.pos = self.k[:, :, idx].contiguous(), self.v[:, :, idx].contiguous(), self.pos[idx]

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v)

    def tensors(self):
        return {"k": self.k, "v": self.v} if self.k is not None else {}
