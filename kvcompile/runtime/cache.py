"""The runtime KV cache: a transformers ``Cache`` whose layers hold per-head-group strategy stores.

Per layer, the KV heads that share a strategy spec form a *head group*; each group owns one
:class:`~kvcompile.strategies.Store` (its own physical tensors), created lazily on the first update,
when batch, dtype and device are known.

How attention finds the layer
-----------------------------
transformers calls ``cache.update(k, v, layer_idx)`` and then the registered attention function,
but never passes the cache to that function. :meth:`KVCompileLayer.update` therefore returns the
*new* ``(k, v)`` unchanged and records ``id(k) -> (weakref(k), layer)`` in :func:`pending` (a
per-thread / per-task context variable); the ``"kvcompile"`` attention function
(``runtime/attention.py``) pops that entry, runs attention per group over the store plus the new
tokens, and only then folds the new tokens into the stores. The
weakref guards against ``id`` reuse after garbage collection.

Invariants
----------
* ``get_seq_length()`` is the LOGICAL number of tokens the layer has seen (padding included, evicted
  tokens included), so positions and mask sizes equal those of a ``DynamicCache``.
* Stores are mutated only by the attention function, in the order attend → append, once per forward.

Memory and context
------------------
``make_cache`` passes the plan's context to every layer; stores allocate their buffers once for it
(KIVI codes/scales/residual, full and fp8 rows; a composition sizes its buffers at the prefill:
``kept(prefill) + context - prefill``), so a decode step writes its token in place.
``nbytes()`` is the live bytes (== ``plan.predicted_kv_bytes``), ``reserved_nbytes()`` the allocation.
A sequence longer than the plan's context is served, not truncated: the first layer issues one
:class:`PlanWarning` naming the overflow, buffers grow by doubling, and bytes keep following
``plan.predicted_kv_bytes(tokens)`` — i.e. past the byte ceiling the plan promised at its context,
which is why the warning is raised (compile the plan for the longer context to keep the ceiling).
"""

from __future__ import annotations

import contextvars
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..codegen.schedule import HeadGroup, group_heads
from ..strategies import Store, Strategy


class PlanWarning(UserWarning):
    """The plan fits the model's shapes but its provenance differs (fingerprint, dtype), or a sequence
    outgrew the context the plan was compiled for."""


_PENDING: contextvars.ContextVar[dict[int, tuple[weakref.ReferenceType[torch.Tensor], KVCompileLayer]] | None] = (
    contextvars.ContextVar("kvcompile_pending", default=None)
)


def pending() -> dict[int, tuple[weakref.ReferenceType[torch.Tensor], KVCompileLayer]]:
    """This thread's / task's ``id(new key tensor) -> (weakref to it, layer)`` table: filled by
    ``update()``, emptied by the attention function. A context variable, so concurrent generations
    in other threads or asyncio tasks never see each other's entries."""
    table = _PENDING.get()
    if table is None:
        table = {}
        _PENDING.set(table)
    return table


class KVCompileLayer(CacheLayerMixin):
    """One model layer: its head groups and their stores. See the module docstring."""

    is_sliding = False
    is_compileable = False
    is_croppable = True  # per store: crop() raises for formats that cannot forget tokens

    def __init__(
        self,
        layer_idx: int,
        strategies: Sequence[Strategy],
        head_dim: int,
        gqa: int,
        backend: str = "torch",
        context: int | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.context = context  # the plan's context: stores reserve their buffers for it
        self.overflowed = False  # warned that the sequence outgrew the context
        self.backend = backend
        self.head_dim = head_dim
        self.gqa = gqa
        self.num_kv_heads = len(strategies)
        self.groups = group_heads(strategies, gqa)
        self.stores: list[Store] | None = None
        self.seen = 0
        self._index: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}

    def __repr__(self) -> str:
        groups = [(g.strategy.label(), g.kv_heads) for g in self.groups]
        return f"KVCompileLayer({self.layer_idx}, groups={groups})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        if (heads, dim) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"layer {self.layer_idx}: keys have {heads} heads x head_dim {dim}, the plan expects "
                f"{self.num_kv_heads} x {self.head_dim}"
            )
        self.dtype, self.device, self.batch_size = key_states.dtype, key_states.device, batch
        self.stores = [
            g.strategy.new_store(
                batch=batch,
                num_heads=len(g.kv_heads),
                head_dim=dim,
                gqa=self.gqa,
                dtype=self.dtype,
                device=self.device,
            )
            for g in self.groups
        ]
        if self.context is not None:
            for store in self.stores:
                store.reserve(self.context)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Count the new tokens and hand them on; the stores take them in the attention function."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.batch_size:
            raise ValueError(
                f"layer {self.layer_idx}: batch changed from {self.batch_size} to {key_states.shape[0]}"
            )
        self.seen += key_states.shape[-2]
        if self.context is not None and self.seen > self.context and not self.overflowed:
            self.overflowed = True
            if self.layer_idx == 0:
                warnings.warn(
                    f"sequence of {self.seen} tokens exceeds the plan's context {self.context}: stores grow "
                    "past the plan's byte ceiling (bytes follow plan.predicted_kv_bytes(tokens)); compile the "
                    "plan for a longer context to keep the ceiling",
                    PlanWarning,
                    stacklevel=3,
                )
        pending()[id(key_states)] = (weakref.ref(key_states), self)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def index(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per group: (kv head, query head) index tensors on ``device``; None for a whole-layer group."""
        if device not in self._index:
            self._index[device] = [
                None
                if len(g.kv_heads) == self.num_kv_heads
                else (torch.tensor(g.kv_heads, device=device), torch.tensor(g.q_heads, device=device))
                for g in self.groups
            ]
        return self._index[device]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.stores or ())

    def reserved_nbytes(self) -> int:
        return sum(s.reserved_nbytes() for s in self.stores or ())

    def reset(self) -> None:
        self.stores, self.seen, self.is_initialized, self.overflowed = None, 0, False, False

    def offload(self) -> None:  # stores are not plain keys/values tensors; offloading is not supported
        raise NotImplementedError("KVCompileCache does not support offloading")

    def prefetch(self) -> None:
        raise NotImplementedError("KVCompileCache does not support offloading")

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest ``-tokens_to_remove`` tokens (transformers' convention: negative = how
        many; assisted decoding and prompt lookup). Each store crops itself or raises
        NotImplementedError naming why its format cannot (e.g. a KIVI group already quantized)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative count of tokens to remove")
        m = -tokens_to_remove
        if m == 0 or not self.is_initialized:
            return
        if m > self.seen:
            raise ValueError(f"layer {self.layer_idx}: cannot crop {m} of {self.seen} tokens")
        for store in self.stores or ():
            store.crop(m)
        self.seen -= m

    def _batch(self, fn, new_batch: int) -> None:
        if not self.is_initialized:
            return
        for store in self.stores or ():
            store.batch_apply(fn)
        self.batch_size = new_batch

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]`` in every store."""
        idx = beam_idx.to(self.device) if self.is_initialized else beam_idx
        self._batch(lambda t: t.index_select(0, idx.to(t.device)), len(beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = self.batch_size * repeats if self.is_initialized else 0
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0), n)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            n = int(indices.sum()) if indices.dtype == torch.bool else len(indices)
            self._batch(lambda t: t[indices.to(t.device)], n)


class KVCompileCache(Cache):
    """A transformers Cache built from a plan; pass it as ``cache=`` (``kvcompile._compat.cache_kw``) to a model.

    Build it with :func:`kvcompile.runtime.make_cache` (or ``plan.make_cache(model)``), which checks
    the plan against the model first. One cache serves one batch of sequences; make a new one (or
    call ``reset()``) for the next.

    Example
    -------
    >>> cache = plan.make_cache(model)                                       # doctest: +SKIP
    >>> out = model.generate(ids, cache=cache, max_new_tokens=32)  # doctest: +SKIP
    >>> cache.nbytes(), cache.layer_bytes()[0]                               # doctest: +SKIP
    """

    layers: list[KVCompileLayer]  # type: ignore[assignment]  # Cache types it as a union of its own layers
    previous_attn_implementation: str  # set by make_cache: the model's attention setting before it
    plan_shard: Any  # set by make_rank_cache: the rank's sub-plan (a Plan)

    def __init__(
        self,
        strategies: Sequence[Sequence[Strategy]],
        *,
        head_dim: int,
        gqa: int,
        backend: str = "torch",
        notes: Sequence[str] = (),
        context: int | None = None,
    ) -> None:
        layers = [KVCompileLayer(i, row, head_dim, gqa, backend, context) for i, row in enumerate(strategies)]
        super().__init__(layers=cast(list[Any], layers))
        self.backend = backend
        self.notes = list(notes)

    def nbytes(self) -> int:
        """Bytes of every tensor the stores hold right now (codes, scales, residuals, metadata)."""
        return sum(layer.nbytes() for layer in self.layers)

    def reserved_nbytes(self) -> int:
        """Bytes the stores have allocated (capacity reserved for the plan's context included)."""
        return sum(layer.reserved_nbytes() for layer in self.layers)

    def layer_bytes(self) -> list[dict[str, Any]]:
        """Per layer: ``{"layer", "bytes", "groups": [{"strategy", "kv_heads", "bytes"}]}`` (JSON-able)."""
        out = []
        for layer in self.layers:
            groups: list[dict[str, Any]] = [
                {
                    "strategy": g.strategy.label(),
                    "kv_heads": list(g.kv_heads),
                    "bytes": layer.stores[i].nbytes() if layer.stores else 0,
                }
                for i, g in enumerate(layer.groups)
            ]
            out.append({"layer": layer.layer_idx, "bytes": sum(g["bytes"] for g in groups), "groups": groups})
        return out

    def stores(self, layer_idx: int) -> list[tuple[HeadGroup, Store]]:
        """The (group, store) pairs of a layer, for inspection; empty before the first forward."""
        layer = self.layers[layer_idx]
        return list(zip(layer.groups, layer.stores, strict=True)) if layer.stores else []
