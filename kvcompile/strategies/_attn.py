"""Masked attention shared by the reference stores (float32, chunked over queries).

Stores keep keys in arbitrary formats; each dequantizes what it holds, appends the new tokens and
calls :func:`masked_attention` with a key-validity mask. Queries are processed in chunks so a 4k
prefill never materialises a [T, N] score matrix per head at once, and each chunk only reads the
keys it can see (causality), halving prefill work.
"""

from __future__ import annotations

import math

import torch

QUERY_CHUNK = 512
MASS_CHUNK = 256  # smaller chunks keep the probability tile in cache for the column sums


def leading_pads(valid_new: torch.Tensor) -> torch.Tensor:
    """[B] int64: number of leading False entries (left padding) of each row of ``valid_new`` [B, T]."""
    return (~valid_new).long().cumprod(dim=1).sum(dim=1)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_ok: torch.Tensor,
    scale: float,
    *,
    col_sums: bool = False,
    chunk: int = QUERY_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention of the T new queries over N keys whose last T are the new tokens.

    Parameters
    ----------
    q : [B, Hk*G, T, D]; query head ``j`` reads KV head ``j // G``.
    k, v : [B, Hk, N, D] / [B, Hk, N, Dv] (any float dtype; computed in float32).
    key_ok : [B, Hk, N] or [B, 1, N] bool, False for keys never to attend (padding, empty slots).
    col_sums : also return the attention mass each key received, summed over the T queries and the
        G query heads of its KV head: [B, Hk, N] float32 (H2O's accumulated score).

    Query ``t`` sees key ``j`` iff ``key_ok[j]`` and ``j <= N - T + t``. Queries that see no key
    (left-padding rows) contribute no mass; their output is undefined (finite) and never read.
    Without ``col_sums`` the fused ``scaled_dot_product_attention`` computes the same thing.
    """
    out = _sdpa(q, k, v, key_ok, scale, chunk)
    if not col_sums:
        return out, None
    B, Hq, T, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    G = Hq // Hk
    past = N - T
    qf = (q.float() * scale).view(B, Hk, G, T, D)
    kf = k.float()
    mass = torch.zeros(B, Hk, N, dtype=torch.float32, device=q.device)
    not_ok = ~key_ok.expand(B, Hk, N)[:, :, None, None, :]
    masked = bool(not_ok.any())
    chunk = min(chunk, MASS_CHUNK)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        n1 = past + t1  # keys beyond this are in every chunk query's future
        s = torch.einsum("bhgtd,bhnd->bhgtn", qf[:, :, :, t0:t1], kf[:, :, :n1])
        if masked:
            s.masked_fill_(not_ok[..., :n1], -math.inf)
        t = torch.arange(t0, t1, device=q.device)[:, None]
        future = torch.arange(past + t0, n1, device=q.device)[None, :] > past + t  # only new keys
        s[..., past + t0 :].masked_fill_(future, -math.inf)
        p = torch.softmax(s, dim=-1)
        if masked:
            p.nan_to_num_(nan=0.0)  # a query with no visible key (padding) gives no mass
        mass[:, :, :n1] += p.sum(dim=(2, 3))
    return out, mass


def _sdpa(q, k, v, key_ok, scale, chunk):
    """Same attention through ``scaled_dot_product_attention`` (fused on CPU and GPU), used when no
    probabilities are needed. A query that sees no key (padding) attends to its own token instead of
    producing NaN; its output is never read by real tokens, but NaN would poison later layers."""
    B, Hq, T, _ = q.shape
    Hk, N = k.shape[1], k.shape[2]
    G, past = Hq // Hk, N - T
    ok = key_ok.expand(B, -1, N)
    if ok.shape[1] > 1 and bool((ok == ok[:, :1]).all()):
        ok = ok[:, :1]  # one mask for all heads (prefill, fp8/quant stores)
    if ok.shape[1] > 1:
        ok = ok[:, :, None].expand(B, Hk, G, N).reshape(B, Hq, N)  # query head j reads KV head j // G
    k, v = k.to(q.dtype), v.to(q.dtype)
    if past == 0 and bool(ok.all()):  # plain causal prefill: no mask tensor at all
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=G > 1
        )
    return _sdpa_masked(q, k, v, ok, scale, chunk)


def _sdpa_masked(q, k, v, ok, scale, chunk):
    B, Hq, T, _ = q.shape
    Hk, N = k.shape[1], k.shape[2]
    past = N - T
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        t = torch.arange(t0, t1, device=q.device)[:, None]
        j = torch.arange(past + t1, device=q.device)[None, :]
        mask = ok[:, :, None, : past + t1] & (j <= past + t)  # [B, 1|Hq, Tc, Nc]
        own = j == past + t
        mask = mask | (~mask.any(-1, keepdim=True) & own)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, t0:t1],
                k[:, :, : past + t1],
                v[:, :, : past + t1],
                attn_mask=mask,
                scale=scale,
                enable_gqa=Hq != Hk,
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
