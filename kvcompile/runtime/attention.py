"""The ``"kvcompile"`` attention function, registered with transformers' ``AttentionInterface``.

:func:`register` adds ``kvcompile_attention`` under the name ``"kvcompile"`` (and transformers' own
``sdpa_mask`` as its mask function, so the model builds exactly the masks it builds for ``"sdpa"``).
``make_cache`` switches a model to it with ``model.set_attn_implementation("kvcompile")``; no model
class is patched.

For every call, the function looks up the key tensor in :func:`kvcompile.runtime.cache.pending`:

* found (the model runs with a :class:`KVCompileCache`): for each head group of that layer, slice the
  group's query and KV heads, ``store.attend`` (over the store plus the new tokens), then
  ``store.append``, and scatter the outputs back into query-head order;
* not found (a ``DynamicCache``, or no cache): call transformers' ``sdpa_attention_forward``
  unchanged, so the model behaves exactly as with ``attn_implementation="sdpa"``.

Validity of the new tokens (``valid_new``, [B, T], False for left padding) comes from the mask the
model passes in: the last query row over the last T key columns (bool: True = attend; float:
additive, 0 = attend); ``None`` means no padding. Only left padding is supported: the last query
of every row must be a real token, which holds for left-padded batches and for generation.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..strategies import Store
from .cache import KVCompileLayer, pending
from .interpreter import is_attached, run_layer

ATTN_IMPLEMENTATION = "kvcompile"
BACKENDS = ("torch", "cpu", "triton-interpret", "triton")  # all but "torch" run runtime/interpreter.py


def register() -> None:
    """Register the ``"kvcompile"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvcompile_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def new_token_validity(mask: torch.Tensor | None, batch: int, new: int, device: torch.device) -> torch.Tensor:
    """[B, T] bool: which of the ``new`` tokens are real (not padding), read from the model's mask.

    ``mask`` is what the model passes to attention: None (no padding), a [B|1, 1, T, K] bool
    (True = attend) or additive float mask (0 = attend), or a 2D [B, K] padding mask (nonzero = real).
    In a 4D mask a real new key is attended by at least its own query row and a padding key by no
    row, so a key column's validity is "any row attends it" (robust to sliding-window masks too).
    """
    if mask is None:
        return torch.ones(batch, new, dtype=torch.bool, device=device)
    if mask.dim() not in (2, 4):
        raise ValueError(f"attention_mask must be 2D or 4D, got shape {tuple(mask.shape)}")
    cols = mask[..., -new:]
    if cols.dtype != torch.bool:
        cols = (
            cols > torch.finfo(cols.dtype).min / 2
            if cols.is_floating_point() and mask.dim() == 4
            else cols != 0
        )
    if mask.dim() == 4:
        cols = cols[:, 0, -new:].any(dim=-2)
    return cols.to(device).expand(batch, new)


def _run_group(
    store: Store,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Attention of one head group, then fold its new tokens into the store: the one per-group call.

    q: [B, Hg*G, T, D]; k, v: [B, Hg, T, D]; valid: [B, T] bool. Returns [B, Hg*G, T, Dv]. This is
    the store's reference (torch) path; kernel backends and attached schedules never reach it, they
    run through ``runtime/interpreter.py`` (see :func:`attend_layer`).
    """
    if backend != "torch":
        raise ValueError(f"backend={backend!r} is not available; choose one of {list(BACKENDS)}")
    out = store.attend(q, k, v, valid, scale)
    store.append(k, v, q, valid)
    return out


def attend_layer(
    layer: KVCompileLayer,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Run every head group of ``layer``; returns [B, Hq, T, Dv] in query-head order."""
    if layer.backend != "torch" or is_attached(layer):  # the schedule interpreter (codegen kernels)
        return run_layer(layer, q, k, v, valid, scale)
    index = layer.index(q.device)
    stores = cast("list[Store]", layer.stores)  # allocated by the layer's update(), which runs first
    if len(stores) == 1 and index[0] is None:
        return _run_group(stores[0], q, k, v, valid, scale, layer.backend)
    B, _, T, _ = q.shape
    out = q.new_empty(B, q.shape[1], T, v.shape[-1])
    pairs = cast("list[tuple[torch.Tensor, torch.Tensor]]", index)  # several groups: none is whole-layer
    for store, (kv_idx, q_idx) in zip(stores, pairs, strict=True):
        o = _run_group(
            store,
            q.index_select(1, q_idx),
            k.index_select(1, kv_idx),
            v.index_select(1, kv_idx),
            valid,
            scale,
            layer.backend,
        )
        out.index_copy_(1, q_idx, o.to(out.dtype))
    return out


def kvcompile_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature; output [B, T, Hq, Dv] like ``sdpa_attention_forward``."""
    entry = pending().pop(id(key), None)
    if entry is None or entry[0]() is not key:
        _check_no_pending()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer = entry[1]
    if dropout and module.training:
        raise ValueError("kvcompile attention is inference-only: dropout must be 0 (call model.eval())")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    T = key.shape[2]
    if attention_mask is None:
        valid = new_token_validity(None, query.shape[0], T, query.device)
    else:
        keys = min(attention_mask.shape[-1], layer.seen)  # the past keys plus the new ones
        cols = new_token_validity(attention_mask, query.shape[0], keys, query.device)
        if bool((cols[:, 1:] < cols[:, :-1]).any()):
            raise ValueError(
                "attention_mask: zeros that are not leading left padding (a hole or right padding) are "
                "not supported by the kvcompile cache"
            )
        valid = cols[:, -T:]
    out = attend_layer(layer, query, key, value, valid, scale)
    return out.transpose(1, 2).contiguous(), None


def _check_no_pending() -> None:
    """A miss while a KVCompileCache layer still waits for its attention call means the model changed
    the key tensor between ``cache.update`` and attention; running plain sdpa then would silently
    ignore the cache, so fail loudly instead."""
    table = pending()
    for key_id, (ref, layer) in list(table.items()):
        if ref() is None:
            del table[key_id]
        else:
            del table[key_id]
            raise RuntimeError(
                f"kvcompile: layer {layer.layer_idx} was updated but its attention call received other key "
                "tensors; this model transforms keys between cache.update and attention, which the "
                "kvcompile runtime does not support"
            )
