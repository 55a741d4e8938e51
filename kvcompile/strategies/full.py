"""The uncompressed cache: every token's K and V in the model dtype (or a narrower float)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .base import SlotBuffer, Store, Strategy, check_range, tensor_bytes

_STORAGE = {"model": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Full(Strategy):
    """Keep all tokens. ``dtype="model"`` stores the model's own dtype; ``bfloat16``/``float16``
    store an fp32 model's cache at half width (attention still runs in the model dtype).

    Reference: the standard KV cache (Pope et al., "Efficiently Scaling Transformer Inference", 2022).
    """

    name: ClassVar[str] = "full"
    paper: ClassVar[str] = "Pope et al. 2022, Efficiently Scaling Transformer Inference (arXiv:2211.05102)"
    dtype: str = "model"

    def check(self) -> None:
        check_range("dtype", self.dtype, allowed=tuple(_STORAGE))

    def short_label(self) -> str:
        return "full" if self.dtype == "model" else f"full:{self.dtype}"

    def storage_bytes(self, dtype_bytes: int) -> int:
        t = _STORAGE[self.dtype]
        return dtype_bytes if t is None else t.itemsize

    def bytes_for(self, tokens: int, head_dim: int, dtype_bytes: int) -> int:
        return 2 * tokens * head_dim * self.storage_bytes(dtype_bytes)

    def new_store(self, *, batch, num_heads, head_dim, gqa, dtype, device) -> FullStore:
        return FullStore(_STORAGE[self.dtype] or dtype, dtype)


class FullStore(Store):
    """K, V: [B, Hg, N, D] in the storage dtype; ``lead[b]`` left-padding tokens of row b are masked."""

    def __init__(self, storage: torch.dtype, compute: torch.dtype) -> None:
        self.storage, self.compute = storage, compute
        self.rows = SlotBuffer()  # k, v: preallocated for the plan's context (``reserve``)
        self.lead: torch.Tensor | None = None  # [B] int64, row bookkeeping (not KV storage)
        self.tokens_seen = 0

    k = property(lambda self: self.rows.view("k"))
    v = property(lambda self: self.rows.view("v"))

    def reserve(self, context: int) -> None:
        self.rows.reserve(context)

    def reserved_nbytes(self) -> int:
        return self.rows.reserved_nbytes()

    def attend(self, q, k_new, v_new, valid_new, scale):
        B, T = q.shape[0], q.shape[2]
        if self.k is None and bool(valid_new.all()):  # unpadded prefill: plain causal, SDPA's fast kernel
            return torch.nn.functional.scaled_dot_product_attention(
                q, k_new, v_new, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k_new.shape[1]
            )
        k = k_new if self.k is None else torch.cat([self.k.to(self.compute), k_new], dim=2)
        v = v_new if self.v is None else torch.cat([self.v.to(self.compute), v_new], dim=2)
        N = k.shape[2]
        past = N - T
        pos = torch.arange(N, device=q.device)
        allowed = pos[None, :] <= (past + torch.arange(T, device=q.device))[:, None]  # [T, N]
        key_ok = torch.ones(B, N, dtype=torch.bool, device=q.device)
        if self.lead is not None:
            key_ok[:, :past] = pos[None, :past] >= self.lead[:, None]
        key_ok[:, past:] = valid_new
        mask = allowed[None, None] & key_ok[:, None, None, :]  # [B, 1, T, N]
        # queries on padding rows see no key; give them their own position so softmax stays finite
        own = pos[None, :] == (past + torch.arange(T, device=q.device))[:, None]  # [T, N] (device-safe)
        mask = mask | (~mask.any(-1, keepdim=True) & own)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )

    def append(self, k_new, v_new, q_new, valid_new):
        if self.lead is None:
            self.lead = (~valid_new).long().cumprod(dim=1).sum(dim=1)  # leading padding count per row
        self.rows.append(k=k_new.to(self.storage), v=v_new.to(self.storage))
        self.tokens_seen += k_new.shape[2]

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v)

    def crop(self, tokens: int) -> None:
        self.rows.crop(tokens)
        self.tokens_seen -= tokens

    def tensors(self):
        return {"k": self.k, "v": self.v} if self.k is not None else {}
