"""Question-agnostic token selection by context reconstruction (KVzip-style) and the Knorm baseline.

KVzip (Kim et al. 2025, arXiv:2505.23416): after the context is prefilled, the model re-reads it as if
asked to reproduce it; each cached context token is scored, per KV head, by the largest attention any
reconstruction query (and any of the G query heads of that KV head) gives it. Tokens that nobody needs
to reproduce the context are evicted, whatever question comes later. Implemented here:

* :func:`reconstruction_scores`: prefill ``ids`` into a full cache, then feed the context again in
  chunks of ``chunk`` tokens (each chunk attends to the cached context and itself, the cache is cropped
  back after each chunk, so memory is one chunk's attention row per layer: ``chunk x (N + chunk)``
  floats per query head). Unlike the paper no "Repeat the previous context:" prompt is inserted (it needs
  a tokenizer; the copy pattern, induction over the first copy, is what the score measures). Costs two
  extra context forwards (~2x prefill FLOPs; counted in the plan's predicted prefill time).
* :func:`kvzip_prefill`: scores, then the real prefill into the plan's cache with :class:`KVzip` stores
  keeping everything, then each store keeps its ``budget`` highest-scoring tokens plus ``sinks`` first
  tokens (physically compacted: SnapKV's layout ``k, v, pos``, so the same decode kernels apply).
* Without :func:`kvzip_prefill` or injected scores (any other caller, e.g. an engine that only calls the
  cache) a KVzip store keeps its sinks and the most recent tokens (StreamingLLM), so it is never over
  budget; the stores do not observe attention themselves (``observe = "none"``).

Knorm (Devoto et al. 2024, arXiv:2406.11430): keep the keys with the lowest L2 norm (question-agnostic,
no attention needed); a baseline.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, ClassVar

import torch

from ._select import TIER, Selection, SelectStore, keep_top
from .base import check_range

_DEFER: contextvars.ContextVar[bool] = contextvars.ContextVar("kvzip_defer", default=False)
_SCORES: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("kvzip_scores", default=None)
_COLLECT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("kvzip_collect", default=None)
ATTN_NAME = "kvcompile_kvzip"


@dataclasses.dataclass(frozen=True)
class KVzip(Selection):
    """Keep the ``budget`` context tokens with the highest reconstruction score (``sinks`` first tokens
    always kept, within the budget); tokens after the prefill are all kept (module docstring)."""

    name: ClassVar[str] = "kvzip"
    paper: ClassVar[str] = (
        "Kim et al. 2025, KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction (arXiv:2505.23416)"
    )
    budget: int = 256
    sinks: int = 4
    chunk: int = 512

    def check(self) -> None:
        check_range("budget", self.budget, lo=1, hi=1 << 24)
        check_range("sinks", self.sinks, lo=0, hi=self.budget)
        check_range("chunk", self.chunk, lo=16, hi=1 << 20)

    def short_label(self) -> str:
        return f"kvzip:{self.budget}"

    def cap(self) -> int:
        return self.budget

    def kept_seq(self, prefill: int, decoded: int) -> int:
        return self.kept(prefill) + decoded

    def priority_from(self, pos: torch.Tensor, scores: torch.Tensor, lead: torch.Tensor) -> torch.Tensor:
        prio = scores.double()
        rank = pos.double() - lead[:, None, None].double()
        return torch.where((rank < self.sinks) & (pos >= 0), 2 * TIER + pos.double(), prio)

    def priority(self, pos, mass, lead, seen, prefill):
        n = pos.shape[-1]
        if seen != prefill or n <= self.cap() or _DEFER.get():
            return None  # later tokens are kept; a deferred prefill is compacted by kvzip_prefill
        scores = _SCORES.get()
        if scores is None or scores.shape != pos.shape:
            scores = pos.double() / max(seen, 1)  # no reconstruction scores: sinks + most recent (StreamingLLM)
        return self.priority_from(pos, scores, lead), self.cap()

    def new_store(self, *, batch, num_heads, head_dim, gqa, dtype, device) -> KVzipStore:
        return KVzipStore(self, dtype)


class KVzipStore(SelectStore):
    """SelectStore that can be compacted after the prefill with externally computed scores."""

    s: KVzip

    def compact(self, scores: torch.Tensor) -> None:
        """Keep the top ``budget`` slots by ``scores`` [B, Hg, N] (one per held slot)."""
        if self.k is None or self.pos is None or self.lead is None:
            raise ValueError("kvzip: compact() before any prefill")
        if scores.shape != self.pos.shape:
            raise ValueError(f"kvzip: scores {tuple(scores.shape)} do not match slots {tuple(self.pos.shape)}")
        if self.pos.shape[-1] <= self.s.cap():
            return
        idx = keep_top(self.s.priority_from(self.pos, scores.to(self.pos.device), self.lead), self.pos, self.s.cap())
        self.k = torch.gather(self.k, 2, idx[..., None].expand(-1, -1, -1, self.k.shape[-1])).contiguous()
        self.v = torch.gather(self.v, 2, idx[..., None].expand(-1, -1, -1, self.v.shape[-1])).contiguous()
        self.pos = torch.gather(self.pos, 2, idx).contiguous()


@contextlib.contextmanager
def injected_scores(scores: torch.Tensor | None):
    """Within the block, a KVzip store's prefill uses ``scores`` [B, Hg, N] (calibration)."""
    token = _SCORES.set(scores)
    try:
        yield
    finally:
        _SCORES.reset(token)


# ---- the reconstruction scorer (model level) --------------------------------------------------------
def _kvzip_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    col = _COLLECT.get()
    if col is not None and col["active"]:
        n = col["n"]
        hq, hk = query.shape[1], key.shape[1]
        scale = float(kwargs.get("scaling") or query.shape[-1] ** -0.5)
        q = query[0].float()  # [Hq, T, D]
        k = key[0].float().repeat_interleave(hq // hk, dim=0)  # [Hq, N + T, D]
        t = q.shape[1]
        logits = torch.einsum("htd,hnd->htn", q, k) * scale
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        logits[:, :, -t:].masked_fill_(causal, float("-inf"))
        att = logits.softmax(-1)[:, :, :n].amax(1)  # [Hq, N]: max over reconstruction queries
        s = att.view(hk, hq // hk, n).amax(1)[None]  # [1, Hk, N]: max over the KV head's query heads
        prev = col["scores"].get(module.layer_idx)
        col["scores"][module.layer_idx] = s if prev is None else torch.maximum(prev, s)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _kvzip_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


@torch.no_grad()
def reconstruction_scores(model: Any, ids: torch.Tensor, chunk: int = 512, cache: Any = None) -> list[torch.Tensor]:
    """Per layer ``[1, Hk, N]``: the largest attention each of the ``N`` context tokens ``ids`` [1, N]
    receives from the queries re-reading the context (module docstring). ``cache``: a transformers cache
    that already holds exactly the context (its prefill is then skipped; it is cropped back after use)."""
    from transformers import DynamicCache

    from .._compat import cache_kw

    if ids.shape[0] != 1:
        raise ValueError("kvzip scoring runs one sequence at a time")
    n = ids.shape[1]
    prefilled = cache is not None
    cache = cache if prefilled else DynamicCache(config=model.config)
    if prefilled and cache.get_seq_length() != n:
        raise ValueError(f"kvzip: the given cache holds {cache.get_seq_length()} tokens, the context {n}")
    _register()
    previous = model.config._attn_implementation
    col: dict[str, Any] = {"n": n, "active": False, "scores": {}}
    token = _COLLECT.set(col)
    model.set_attn_implementation(ATTN_NAME)
    try:
        if not prefilled:
            model(ids, use_cache=True, logits_to_keep=1, **cache_kw(cache))
        col["active"] = True
        for a in range(0, n, chunk):
            model(ids[:, a: a + chunk], use_cache=True, logits_to_keep=1, **cache_kw(cache))
            cache.crop(n - cache.get_seq_length())  # negative: drop the chunk again
    finally:
        model.set_attn_implementation(previous)
        _COLLECT.reset(token)
    return [col["scores"][i] for i in sorted(col["scores"])]


def has_kvzip(cache: Any) -> bool:
    """Whether a kvcompile cache has a KVzip head group (so its prefill should go through kvzip_prefill)."""
    for layer in getattr(cache, "layers", ()):
        for g in getattr(layer, "groups", ()):
            if isinstance(g.strategy, KVzip):
                return True
    return False


@torch.no_grad()
def kvzip_prefill(model: Any, ids: torch.Tensor, cache: Any, **forward_kw: Any) -> Any:
    """Prefill ``ids`` [1, N] into ``cache`` (a kvcompile cache) with KVzip groups compacted by their
    reconstruction scores afterwards; returns the model output of the prefill."""
    from .._compat import cache_kw

    chunks = [g.strategy.chunk for layer in cache.layers for g in getattr(layer, "groups", ())
              if isinstance(g.strategy, KVzip)]
    scores = reconstruction_scores(model, ids, chunk=min(chunks) if chunks else 512)
    token = _DEFER.set(True)
    try:
        out = model(ids, use_cache=True, **forward_kw, **cache_kw(cache))
    finally:
        _DEFER.reset(token)
    for li in range(len(cache.layers)):
        for group, store in cache.stores(li):
            if isinstance(store, KVzipStore):
                store.compact(scores[li][:, list(group.kv_heads)])
    return out


# ---- Knorm baseline --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KNorm(Selection):
    """Knorm (Devoto et al. 2024, arXiv:2406.11430): at prefill keep the ``budget`` tokens whose keys
    have the lowest L2 norm (low-norm keys draw high attention); later tokens are all kept."""

    name: ClassVar[str] = "knorm"
    paper: ClassVar[str] = (
        "Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (arXiv:2406.11430)"
    )
    budget: int = 256

    def check(self) -> None:
        check_range("budget", self.budget, lo=1, hi=1 << 24)

    def short_label(self) -> str:
        return f"knorm:{self.budget}"

    def cap(self) -> int:
        return self.budget

    def kept_seq(self, prefill: int, decoded: int) -> int:
        return self.kept(prefill) + decoded

    def priority(self, pos, mass, lead, seen, prefill):
        if seen != prefill or pos.shape[-1] <= self.cap():
            return None
        if mass is None:
            raise ValueError("knorm: no key norms recorded at prefill")
        return mass.double(), self.cap()

    def new_store(self, *, batch, num_heads, head_dim, gqa, dtype, device) -> SelectStore:
        return _KNormStore(self, dtype)


class _KNormStore(SelectStore):
    def append(self, k_new, v_new, q_new, valid_new):
        if self.k is None:  # the priority is minus the key norm (the store passes it as ``mass``)
            self._mass = -k_new.float().norm(dim=-1)
        super().append(k_new, v_new, q_new, valid_new)
