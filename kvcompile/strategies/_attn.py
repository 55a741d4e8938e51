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
    (left-padding rows) output zeros and contribute no mass.
    """
    B, Hq, T, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    G = Hq // Hk
    past = N - T
    qf = q.float().view(B, Hk, G, T, D)
    kf, vf = k.float(), v.float()
    out = torch.empty(B, Hk, G, T, v.shape[-1], dtype=torch.float32, device=q.device)
    mass = torch.zeros(B, Hk, N, dtype=torch.float32, device=q.device) if col_sums else None
    ok = key_ok.expand(B, Hk, N)[:, :, None, None, :]
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        n1 = past + t1  # keys beyond this are in every chunk query's future
        s = torch.einsum("bhgtd,bhnd->bhgtn", qf[:, :, :, t0:t1], kf[:, :, :n1]) * scale
        t = torch.arange(t0, t1, device=q.device)[:, None]
        j = torch.arange(n1, device=q.device)[None, :]
        s = s.masked_fill(~(ok[..., :n1] & (j <= past + t)), -math.inf)
        p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
        out[:, :, :, t0:t1] = torch.einsum("bhgtn,bhnd->bhgtd", p, vf[:, :, :n1])
        if mass is not None:
            mass[:, :, :n1] += p.sum(dim=(2, 3))
    return out.view(B, Hq, T, -1).to(q.dtype), mass
