"""ThinK: query-driven pruning of key channels."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ._attn import leading_pads
from .base import Store, Strategy, check_range, tensor_bytes
from .quant import attend_over


@dataclasses.dataclass(frozen=True)
class ThinK(Strategy):
    """ThinK (Xu et al., arXiv:2407.21018): keep ``Dk = ceil(keep_ratio * head_dim)`` key channels
    per KV head, chosen once at prefill by the score ``‖Q_obs[:, d]‖₂ · ‖K[:, d]‖₂`` where ``Q_obs``
    are the last ``obs_window`` (real) queries of the G query heads sharing the KV head and ``K``
    all real prefill keys. Values are kept whole. Attention over stored keys uses the query
    restricted to the kept channels with the original ``scale``; the current forward's new keys
    are used in full precision (as for every strategy).
    """

    name: ClassVar[str] = "think"
    paper: ClassVar[str] = (
        "Xu et al. 2024, ThinK: Thinner Key Cache by Query-Driven Pruning (arXiv:2407.21018)"
    )
    keep_ratio: float = 0.5
    obs_window: int = 32

    def check(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio={self.keep_ratio!r} must be in (0, 1]")
        check_range("obs_window", self.obs_window, lo=1, hi=1 << 16)

    def short_label(self) -> str:
        return f"think:{self.keep_ratio:g}" + ("" if self.obs_window == 32 else f"/obs{self.obs_window}")

    def kept_channels(self, head_dim: int) -> int:
        return max(1, math.ceil(self.keep_ratio * head_dim - 1e-9))

    def bytes_for(self, tokens: int, head_dim: int, dtype_bytes: int) -> int:
        dk = self.kept_channels(head_dim)
        return tokens * (dk + head_dim) * dtype_bytes + (4 * dk if tokens > 0 else 0)

    def kernel_format(self) -> str:
        return "think"

    def new_store(self, *, batch, num_heads, head_dim, gqa, dtype, device) -> ThinKStore:
        return ThinKStore(self, head_dim, dtype)


def channel_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, obs_window: int) -> torch.Tensor:
    """ThinK's channel score ‖Q_obs[:, d]‖ · ‖K[:, d]‖ per KV head: [B, Hk, D] float32.

    q: [B, Hk*G, T, D]; k: [B, Hk, T, D]; valid: [B, T]. ``Q_obs`` are the last ``obs_window``
    positions (padding rows zeroed) of the G query heads of each KV head.
    """
    B, Hk, T, D = k.shape
    w = min(obs_window, T)
    qo = q[:, :, T - w :].float() * valid[:, None, T - w :, None]
    qn = qo.reshape(B, Hk, -1, D).norm(dim=2)  # over G heads x w queries
    kn = (k.float() * valid[:, None, :, None]).norm(dim=2)
    return qn * kn


class ThinKStore(Store):
    """``k``: [B, Hg, N, Dk] model dtype (kept channels, ascending), ``k_channels``: int32
    [B, Hg, Dk], ``v``: [B, Hg, N, D]. Slots before ``lead[b]`` are left padding (masked)."""

    def __init__(self, strategy: ThinK, head_dim: int, dtype: torch.dtype) -> None:
        self.s, self.D, self.dtype = strategy, head_dim, dtype
        self.k = self.v = self.k_channels = None
        self.lead: torch.Tensor | None = None
        self.tokens_seen = 0

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        if self.k_channels is None:
            raise RuntimeError("ThinKStore: channels are chosen at the first append")
        idx = self.k_channels.long()[:, :, None, :].expand(-1, -1, x.shape[2], -1)
        return torch.gather(x, 3, idx)

    def attend(self, q, k_new, v_new, valid_new, scale):
        stored = None
        if self.k is not None:
            # zero-filling pruned channels makes q·k = q[kept]·k[kept] exactly
            idx = self.k_channels.long()[:, :, None, :].expand(-1, -1, self.k.shape[2], -1)
            k = torch.zeros(*self.k.shape[:3], self.D, dtype=k_new.dtype, device=k_new.device)
            k.scatter_(3, idx, self.k.to(k_new.dtype))
            slot = torch.arange(self.k.shape[2], device=k.device)
            stored = (k, self.v, (slot[None, :] >= self.lead[:, None])[:, None, :])
        return attend_over(stored, q, k_new, v_new, valid_new, scale)

    def append(self, k_new, v_new, q_new, valid_new):
        if self.k is None:
            self.lead = leading_pads(valid_new)
            score = channel_scores(q_new, k_new, valid_new, self.s.obs_window)
            top = score.topk(self.s.kept_channels(self.D), dim=-1).indices
            self.k_channels = top.sort(dim=-1).values.to(torch.int32).contiguous()
        kk, vv = self._select(k_new).to(self.dtype), v_new.to(self.dtype)
        self.k = kk if self.k is None else torch.cat([self.k, kk], dim=2)
        self.v = vv if self.v is None else torch.cat([self.v, vv], dim=2)
        self.tokens_seen += k_new.shape[2]

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v, self.k_channels)

    def tensors(self):
        names = ("k", "k_channels", "v")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
