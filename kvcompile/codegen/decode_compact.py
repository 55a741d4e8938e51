"""Decode attention over dense storage: full (any float dtype), fp8 (e4m3 + per-head scale) and
compacted (kept tokens + their positions, for sink/window, H2O and SnapKV stores).

Layouts (per head group, B rows, Hg KV heads, GQA ratio G, query head j reads KV head j // G):

* full:    ``k``, ``v`` [B, Hg, N, D] float; key n of row b is masked when ``n < lead[b]``;
* fp8:     ``k``, ``v`` [B, Hg, N, D] float8_e4m3fn (or its uint8 bits), ``k_scale``, ``v_scale``
  [B, Hg] float32, ``x = fp8 * scale``; masked as full;
* compact: ``k``, ``v`` [B, Hg, N, D] float + ``pos`` [B, Hg, N] int32; masked when ``pos < lead[b]``.

An optional fp *tail* (``k_new``, ``v_new`` [B, Hg, T, D]: the decode step's new tokens, or a
residual window) is attended after the main region; tail token t has position ``tail_pos0 + t``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    FMT_COMPACT,
    FMT_FP8,
    FMT_FULL,
    LOG2E,
    _decode_init,
    _dot,
    _e4m3_to_f32,
    _finish,
    _online_update,
    _program_ids,
    _split_range,
)
from ._launch import (
    FLOAT_DTYPES,
    check_tensor,
    decode_buffers,
    lead_arg,
    reduce_splits,
    split_q,
    tail_args,
)

ALWAYS_VALID = 1 << 40  # tail_pos0 for tails whose tokens are never padding


@triton.jit
def _dense_tokens(
    q,
    m,
    lsum,
    acc,
    base,
    lo,
    hi,
    N,
    k_ptr,
    v_ptr,
    pos_ptr,
    k_scale,
    v_scale,
    lead,
    pos0,
    FMT: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Fold keys ``lo .. hi-1`` of the [.., N, D] region at row ``base`` into (m, lsum, acc):
    ``s = q k^T`` (q pre-scaled), key position ``pos[n]`` (FMT compact) or ``pos0 + n``, masked when
    below ``lead``; fp8 keys decode as ``e4m3(bits) * scale``."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        mask2 = nmask[:, None] & dmask[None, :]
        off = (base * N + offs_n[:, None]) * D + offs_d[None, :]
        kraw = tl.load(k_ptr + off, mask=mask2, other=0)
        vraw = tl.load(v_ptr + off, mask=mask2, other=0)
        if FMT == 1:
            k = _e4m3_to_f32(kraw) * k_scale
            v = _e4m3_to_f32(vraw) * v_scale
        else:
            k = kraw.to(tl.float32)
            v = vraw.to(tl.float32)
        if FMT == 2:
            p = tl.load(pos_ptr + base * N + offs_n, mask=nmask, other=0).to(tl.int64)
        else:
            p = pos0 + offs_n.to(tl.int64)
        valid = nmask & (p >= lead)
        s = _dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s, float("-inf"))
        m, lsum, acc = _online_update(m, lsum, acc, s, v.to(q.dtype))
    return m, lsum, acc


@triton.jit
def _decode_dense_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    ks_ptr,
    vs_ptr,
    kt_ptr,
    vt_ptr,
    lead_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    Hg,
    N,
    Nt,
    tail_pos0,
    qk_scale,
    FMT: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    HAS_LEAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Split-K decode attention partials over dense storage; grid (B * Hg, NUM_SPLITS).

    Split s covers main keys [s*C, (s+1)*C) with C = ceil(ceil(N / NUM_SPLITS) / BLOCK_N) * BLOCK_N;
    the last split also covers the fp tail. Writes (m, lsum, acc) for :func:`_reduce_splits_kernel`.
    """
    pid, b, h, split = _program_ids(Hg)
    q, lead, m, lsum, acc = _decode_init(
        q_ptr, lead_ptr, b, h * G, Hg * G, qk_scale, D, G, HAS_LEAD, BLOCK_G, BLOCK_D
    )
    k_scale = 1.0
    v_scale = 1.0
    if FMT == 1:
        k_scale = tl.load(ks_ptr + pid)
        v_scale = tl.load(vs_ptr + pid)
    lo, hi = _split_range(N, split, NUM_SPLITS, BLOCK_N)
    m, lsum, acc = _dense_tokens(
        q, m, lsum, acc, pid, lo, hi, N, k_ptr, v_ptr, pos_ptr, k_scale, v_scale, lead, 0, FMT, D, BLOCK_N,
        BLOCK_D,
    )  # fmt: skip
    if split == NUM_SPLITS - 1:
        m, lsum, acc = _dense_tokens(
            q, m, lsum, acc, pid, 0, Nt, Nt, kt_ptr, vt_ptr, pos_ptr, 1.0, 1.0, lead, tail_pos0, 0, D,
            BLOCK_N, BLOCK_D,
        )  # fmt: skip
    _finish(m_ptr, l_ptr, acc_ptr, out_ptr, b, h, Hg, split, m, lsum, acc, D, G, BLOCK_G, BLOCK_D, NUM_SPLITS)


@triton.jit
def _scored_tokens(
    q,
    m,
    lsum,
    acc,
    base,
    lo,
    hi,
    N,
    k_ptr,
    v_ptr,
    pos_ptr,
    lead,
    pos0,
    s_ptr,
    s_row0,
    s_stride,
    s_col0,
    COMPACT: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """:func:`_dense_tokens` for float compacted storage (``COMPACT``: positions from ``pos``, else
    ``pos0 + n``) that also writes each key's log2-domain score (``-inf`` if masked) for the G query
    heads to ``s[s_row0 + g, s_col0 + n]`` (row stride ``s_stride``), from which the host derives
    the attention mass H2O accumulates."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = tl.arange(0, BLOCK_G)
    dmask = offs_d < D
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        mask2 = nmask[:, None] & dmask[None, :]
        off = (base * N + offs_n[:, None]) * D + offs_d[None, :]
        k = tl.load(k_ptr + off, mask=mask2, other=0).to(tl.float32)
        v = tl.load(v_ptr + off, mask=mask2, other=0).to(tl.float32)
        if COMPACT:
            p = tl.load(pos_ptr + base * N + offs_n, mask=nmask, other=0).to(tl.int64)
        else:
            p = pos0 + offs_n.to(tl.int64)
        valid = nmask & (p >= lead)
        s = tl.where(valid[None, :], _dot(q, tl.trans(k)), float("-inf"))
        s_off = (s_row0 + offs_g[:, None]) * s_stride + s_col0 + offs_n[None, :]
        tl.store(s_ptr + s_off, s, mask=(offs_g[:, None] < G) & nmask[None, :])
        m, lsum, acc = _online_update(m, lsum, acc, s, v.to(q.dtype))
    return m, lsum, acc


@triton.jit
def _decode_scored_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    kt_ptr,
    vt_ptr,
    lead_ptr,
    s_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    Hg,
    N,
    Nt,
    qk_scale,
    D: tl.constexpr,
    G: tl.constexpr,
    HAS_LEAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Decode attention over compacted storage + new tokens that also emits per-key scores
    ``s`` [B, Hg, G, N + Nt] (log2 domain); grid (B * Hg, NUM_SPLITS), split layout as
    :func:`_decode_dense_kernel`. New tokens are never masked."""
    pid, b, h, split = _program_ids(Hg)
    q, lead, m, lsum, acc = _decode_init(
        q_ptr, lead_ptr, b, h * G, Hg * G, qk_scale, D, G, HAS_LEAD, BLOCK_G, BLOCK_D
    )
    lo, hi = _split_range(N, split, NUM_SPLITS, BLOCK_N)
    m, lsum, acc = _scored_tokens(
        q, m, lsum, acc, pid, lo, hi, N, k_ptr, v_ptr, pos_ptr, lead, 0, s_ptr, pid * G, N + Nt, 0, True, D,
        G, BLOCK_G, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    if split == NUM_SPLITS - 1:
        m, lsum, acc = _scored_tokens(
            q, m, lsum, acc, pid, 0, Nt, Nt, kt_ptr, vt_ptr, pos_ptr, lead, 1 << 40, s_ptr, pid * G, N + Nt,
            N, False, D, G, BLOCK_G, BLOCK_N, BLOCK_D,
        )  # fmt: skip
    _finish(m_ptr, l_ptr, acc_ptr, out_ptr, b, h, Hg, split, m, lsum, acc, D, G, BLOCK_G, BLOCK_D, NUM_SPLITS)


SOURCES = (_dense_tokens, _decode_dense_kernel)
SCORED_SOURCES = (_scored_tokens, _decode_scored_kernel)
LN2 = 0.6931471805599453


def decode_compact_scored(
    q, k, v, pos, *, scale=None, lead=None, k_new=None, v_new=None, num_splits=None, kernels=None
):
    """:func:`decode_compact` that also returns the attention mass of every key, summed over the G query
    heads of its KV head: ``(out [B, Hq, 1, D], mass [B, Hg, N + T] float32)`` over the stored then the
    new tokens (what H2O accumulates, ``SelectStore.observe``). The kernel writes per-key scores; the
    mass is their softmax (scores are log2-domain: ``softmax(s * ln 2)``)."""
    q3, four_d = split_q(q)
    B, Hq, D = q3.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k: expected [B={B}, Hg, N, D={D}], got {tuple(k.shape)}")
    Hg, N = k.shape[1], k.shape[2]
    if Hq % Hg:
        raise ValueError(f"q has {Hq} heads, not a multiple of the {Hg} KV heads")
    G, dev = Hq // Hg, q3.device
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, (B, Hg, N, D), FLOAT_DTYPES, dev)
    if pos is None:
        raise ValueError("pos: required for compacted storage")
    check_tensor("pos", pos, (B, Hg, N), (torch.int32, torch.int64), dev)
    lead_t, has_lead = lead_arg(lead, B, dev)
    kt, vt, Nt = tail_args(k_new, v_new, B, Hg, D, dev)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s, out, parts = decode_buffers(q3, N + Nt, D, G, B, Hg, dev, num_splits)
    scores = torch.empty(B, Hg, G, N + Nt, dtype=torch.float32, device=dev)
    main, red = kernels or (_decode_scored_kernel, None)
    main[(B * Hg, s.num_splits)](
        q3, k, v, pos, kt, vt, lead_t, scores, *parts, out, Hg, N, Nt, scale * LOG2E, D=D, G=G,
        HAS_LEAD=has_lead, **s.launch_meta(),
    )  # fmt: skip
    reduce_splits(parts, out, Hg, D, G, s, red)
    mass = torch.nan_to_num(torch.softmax(scores * LN2, dim=-1), nan=0.0).sum(dim=2)
    return (out[:, :, None] if four_d else out), mass


def _decode_dense(
    fmt,
    q,
    k,
    v,
    *,
    scale,
    pos=None,
    k_scale=None,
    v_scale=None,
    lead=None,
    k_new=None,
    v_new=None,
    tail_pos0=None,
    num_splits=None,
    kernels=None,
):
    q3, four_d = split_q(q)
    B, Hq, D = q3.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k: expected [B={B}, Hg, N, D={D}], got {tuple(k.shape)}")
    Hg, N = k.shape[1], k.shape[2]
    if Hq % Hg:
        raise ValueError(f"q has {Hq} heads, not a multiple of the {Hg} KV heads")
    G = Hq // Hg
    dev = q3.device
    if q3.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q: dtype {q3.dtype} not in {list(FLOAT_DTYPES)}")
    if fmt == FMT_FP8:
        k, v = (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in (k, v))
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, (B, Hg, N, D), (torch.uint8,), dev)
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            if t is None:
                raise ValueError(f"{name}: required for fp8 storage")
            check_tensor(name, t, (B, Hg), (torch.float32,), dev)
    else:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, (B, Hg, N, D), FLOAT_DTYPES, dev)
        k_scale = v_scale = k
    if fmt == FMT_COMPACT:
        if pos is None:
            raise ValueError("pos: required for compacted storage")
        check_tensor("pos", pos, (B, Hg, N), (torch.int32, torch.int64), dev)
    else:
        pos = k
    lead_t, has_lead = lead_arg(lead, B, dev)
    kt, vt, Nt = tail_args(k_new, v_new, B, Hg, D, dev)
    if tail_pos0 is None:
        tail_pos0 = ALWAYS_VALID if fmt == FMT_COMPACT else N
    s, out, parts = decode_buffers(q3, N + Nt, D, G, B, Hg, dev, num_splits)
    main, red = kernels or (_decode_dense_kernel, None)
    main[(B * Hg, s.num_splits)](
        q3,
        k,
        v,
        pos,
        k_scale,
        v_scale,
        kt,
        vt,
        lead_t,
        *parts,
        out,
        Hg,
        N,
        Nt,
        tail_pos0,
        scale * LOG2E,
        FMT=fmt,
        D=D,
        G=G,
        HAS_LEAD=has_lead,
        **s.launch_meta(),
    )
    reduce_splits(parts, out, Hg, D, G, s, red)
    return out[:, :, None] if four_d else out


def decode_full(q, k, v, *, scale=None, lead=None, k_new=None, v_new=None, num_splits=None, kernels=None):
    """Decode attention of ``q`` [B, Hq, 1, D] over a full cache ``k``/``v`` [B, Hg, N, D] plus the
    optional new tokens ``k_new``/``v_new`` [B, Hg, T, D]. Returns [B, Hq, 1, D] in q's dtype.

    >>> out = decode_full(q, k, v, scale=0.125)  # doctest: +SKIP
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _decode_dense(
        FMT_FULL,
        q,
        k,
        v,
        scale=scale,
        lead=lead,
        k_new=k_new,
        v_new=v_new,
        num_splits=num_splits,
        kernels=kernels,
    )


def decode_fp8(
    q, k, v, k_scale, v_scale, *, scale=None, lead=None, k_new=None, v_new=None, num_splits=None, kernels=None
):
    """Decode attention over fp8 storage ``k``/``v`` [B, Hg, N, D] (float8_e4m3fn or its uint8 bits)
    with per-head float32 scales [B, Hg]; otherwise as :func:`decode_full`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _decode_dense(
        FMT_FP8,
        q,
        k,
        v,
        scale=scale,
        k_scale=k_scale,
        v_scale=v_scale,
        lead=lead,
        k_new=k_new,
        v_new=v_new,
        num_splits=num_splits,
        kernels=kernels,
    )


def decode_compact(
    q, k, v, pos, *, scale=None, lead=None, k_new=None, v_new=None, num_splits=None, kernels=None
):
    """Decode attention over compacted storage: kept keys ``k``/``v`` [B, Hg, N, D] with their original
    positions ``pos`` [B, Hg, N]; keys with ``pos < lead[b]`` are masked. New tokens are never masked."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _decode_dense(
        FMT_COMPACT,
        q,
        k,
        v,
        scale=scale,
        pos=pos,
        lead=lead,
        k_new=k_new,
        v_new=v_new,
        num_splits=num_splits,
        kernels=kernels,
    )
