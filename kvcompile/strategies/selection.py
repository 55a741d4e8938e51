"""Token-selection strategies: StreamingLLM sinks+window, H2O heavy hitters, SnapKV.

All share the compact layout of ``_select`` (k, v, pos [, score]); they differ only in which
slots survive, given as a priority per slot (higher = kept; ``TIER`` separates must-keep tiers).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ._select import TIER, Selection
from .base import check_range


@dataclasses.dataclass(frozen=True)
class SinkWindow(Selection):
    """StreamingLLM (Xiao et al., arXiv:2309.17453): the first ``sinks`` real tokens (attention
    sinks) plus the ``window`` most recent tokens; the rest is evicted after every append.

    Positions and RoPE: StreamingLLM caches keys *before* RoPE and re-rotates them by their
    position inside the cache, so the model never sees a distance larger than it was trained on.
    Here keys are cached post-RoPE (that is what the transformers Cache receives), so each kept key
    keeps the rotation of its original position and query/key distances are the true ones. For a
    model used within its trained context (our case: compression, not length extrapolation) this
    is exactly what the model saw, and it avoids a re-rotation per step.
    Kept positions after ``n`` tokens: ``[lead, lead+sinks) ∪ [n-window, n)`` (lead = left padding).
    """

    name: ClassVar[str] = "sink_window"
    paper: ClassVar[str] = (
        "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"
    )
    sinks: int = 4
    window: int = 252

    def check(self) -> None:
        check_range("sinks", self.sinks, lo=0, hi=1 << 20)
        check_range("window", self.window, lo=1, hi=1 << 24)

    def short_label(self) -> str:
        return f"sink{self.sinks}+win{self.window}"

    def cap(self) -> int:
        return self.sinks + self.window

    def priority(self, pos, mass, lead, seen, prefill):
        if pos.shape[-1] <= self.cap():
            return None
        real_rank = pos.double() - lead[:, None, None].double()
        prio = pos.double()  # evicted anyway; within tiers order is irrelevant
        prio = torch.where(pos >= seen - self.window, TIER + prio, prio)
        prio = torch.where((real_rank < self.sinks) & (pos >= 0), 2 * TIER + prio, prio)
        return prio, self.cap()


@dataclasses.dataclass(frozen=True)
class HeavyHitter(Selection):
    """H2O (Zhang et al., arXiv:2306.14048): keep ``budget`` tokens: the ``recent`` newest plus the
    ``budget - recent`` with the largest accumulated attention. Every attend adds the softmax mass
    each stored key received (summed over the new queries and the G query heads of its KV head; at
    prefill over all prompt queries, causal); every append evicts down to the budget.
    """

    name: ClassVar[str] = "heavy_hitter"
    paper: ClassVar[str] = (
        "Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference (arXiv:2306.14048)"
    )
    observe: ClassVar[str] = "all"
    keeps_score: ClassVar[bool] = True
    budget: int = 256
    recent: int = 128

    def check(self) -> None:
        check_range("budget", self.budget, lo=1, hi=1 << 24)
        check_range("recent", self.recent, lo=0, hi=self.budget)

    def short_label(self) -> str:
        return f"h2o:{self.budget}" + ("" if self.recent == self.budget // 2 else f"/r{self.recent}")

    def cap(self) -> int:
        return self.budget

    def kernel_format(self) -> str:
        return "compact_scored"  # the kernel must also return per-key attention mass

    def priority(self, pos, mass, lead, seen, prefill):
        if pos.shape[-1] <= self.budget:
            return None
        prio = mass.double()
        prio = torch.where(pos >= seen - self.recent, TIER + pos.double(), prio)
        return prio, self.budget


@dataclasses.dataclass(frozen=True)
class SnapKV(Selection):
    """SnapKV (Li et al., arXiv:2404.14469): at prefill, score each prefix token by the attention
    the last ``obs_window`` queries give it (summed over those queries and the G query heads),
    smooth with a 1-D max-pool (``pool_kernel``, stride 1, padding k//2), keep the top ``budget``
    prefix tokens plus the observation window (pooling ties broken by the unpooled mass). Later
    tokens are all kept, or only the latest ``decode_window`` of them when set.

    ``bytes_for(n)`` is the size after a prefill of ``n`` tokens; use ``bytes_for_seq`` for
    prefill + decode.
    """

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = (
        "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation (arXiv:2404.14469)"
    )
    observe: ClassVar[str] = "window"
    budget: int = 224
    obs_window: int = 32
    pool_kernel: int = 7
    decode_window: int | None = None

    def check(self) -> None:
        check_range("budget", self.budget, lo=1, hi=1 << 24)
        check_range("obs_window", self.obs_window, lo=1, hi=1 << 16)
        check_range("pool_kernel", self.pool_kernel, lo=1, hi=1 << 10)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel={self.pool_kernel} must be odd")
        if self.decode_window is not None:
            check_range("decode_window", self.decode_window, lo=1, hi=1 << 24)

    def short_label(self) -> str:
        """``snapkv:<budget>``; a non-default observation window, pool kernel or decode window is appended."""
        extra = "" if self.obs_window == 32 else f"/obs{self.obs_window}"
        extra += "" if self.pool_kernel == 7 else f"/pool{self.pool_kernel}"
        extra += "" if self.decode_window is None else f"/dw{self.decode_window}"
        return f"snapkv:{self.budget}{extra}"

    def cap(self) -> int:
        return self.budget + self.obs_window

    @classmethod
    def keeping(cls, n: int) -> SnapKV:
        """The grid's SnapKV holding ``n`` tokens: the last ``min(32, n // 4)`` as the observation window,
        the rest selected."""
        obs = min(32, n // 4)
        return cls(budget=n - obs, obs_window=obs)

    def kept_seq(self, prefill: int, decoded: int) -> int:
        later = decoded if self.decode_window is None else min(decoded, self.decode_window)
        return self.kept(prefill) + later

    def pooled_scores(self, mass: torch.Tensor, prefix: int) -> torch.Tensor:
        """Max-pooled observation mass of the ``prefix`` first slots: [B, Hg, prefix] float32."""
        m = mass[..., :prefix].float()
        k = self.pool_kernel
        shape = m.shape
        pooled = torch.nn.functional.max_pool1d(m.reshape(-1, 1, prefix), k, stride=1, padding=k // 2)
        return pooled.reshape(shape)

    def priority(self, pos, mass, lead, seen, prefill):
        n = pos.shape[-1]
        if seen == prefill:  # the prefill append: select
            if n <= self.cap():
                return None
            if mass is None:
                raise ValueError("snapkv: append() at prefill needs the preceding attend() (observation)")
            prefix = n - self.obs_window
            prio = torch.full(pos.shape, TIER, dtype=torch.float64, device=pos.device) + pos.double()
            # max-pooling creates plateaus of equal scores: break ties by the token's own mass
            # (< 1e-9 relative, below float32 resolution of the pooled score, so never reorders it)
            raw = mass[..., :prefix].double()
            prio[..., :prefix] = self.pooled_scores(mass, prefix).double() + 1e-9 * raw
            return prio, self.cap()
        if self.decode_window is None:
            return None
        keep = self.kept(prefill) + min(seen - prefill, self.decode_window)
        if n <= keep:
            return None
        prio = torch.where(pos < prefill, 2 * TIER, 0.0).double() + pos.double()
        return prio, keep
