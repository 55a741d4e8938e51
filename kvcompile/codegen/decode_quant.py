"""Decode attention over a KIVI-quantized head group: packed codes dequantized in registers, then the
fp residual/new-token tail, online softmax, split-K over the sequence, GQA-aware.

Layout (per head group; B rows, Hg KV heads, Nq quantized tokens, ``bits`` in {8, 4, 2}):
``k_codes``/``v_codes`` uint8 [B, Hg, Nq, D*bits/8] (byte i holds channels i*ppb + j at bit offset
bits*j, ppb = 8/bits); ``k_scale``/``k_zero`` float16 [B, Hg, Nq/group, D] (keys per channel over
``group`` tokens); ``v_scale``/``v_zero`` float16 [B, Hg, Nq, D/v_group] (values per token over
``v_group`` channels); ``x = code * scale + zero``. The fp tail ``k_tail``/``v_tail`` [B, Hg, T, D]
(the store's residual, then the decode step's new token) follows: tail token t has position Nq + t.
Reference: KIVI, Liu et al. 2024 (arXiv:2402.02750); split-K as flash-decoding (Dao et al. 2023).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import LOG2E, _decode_init, _dot, _finish, _online_update, _program_ids, _split_range
from ._launch import (
    FLOAT_DTYPES,
    check_tensor,
    decode_buffers,
    lead_arg,
    reduce_splits,
    split_q,
    tail_args,
)
from .decode_compact import _dense_tokens

BITS_ALLOWED = (8, 4, 2)


@triton.jit
def _unpack(b, BITS: tl.constexpr):
    """Packed bytes [R, C] -> codes [R, C * 8/BITS]: channel ``i*ppb + j`` = ``(b[:, i] >> BITS*j) & mask``
    (``tl.interleave`` of the shifted fields keeps that channel order)."""
    if BITS == 8:
        res = b
    elif BITS == 4:
        res = tl.interleave(b & 15, b >> 4)
    else:
        res = tl.interleave(tl.interleave(b & 3, (b >> 4) & 3), tl.interleave((b >> 2) & 3, b >> 6))
    return res


@triton.jit
def _quant_tokens(
    q,
    m,
    lsum,
    acc,
    base,
    lo,
    hi,
    Nq,
    kc_ptr,
    ks_ptr,
    kz_ptr,
    vc_ptr,
    vs_ptr,
    vz_ptr,
    lead,
    pos_ptr,
    Npos,
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    V_GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_POS: tl.constexpr,
    V_BITS: tl.constexpr,
):
    """Fold quantized keys ``lo .. hi-1`` of row ``base`` into (m, lsum, acc): for channel d of token n,
    ``k = ((byte[n, d // ppb] >> bits*(d % ppb)) & (2^bits-1)) * ks[n // GROUP, d] + kz[n // GROUP, d]``,
    ``v = code * vs[n, d // V_GROUP] + vz[n, d // V_GROUP]``; keys with ``n < lead`` are masked, or
    with ``HAS_POS`` (compositions, MiKV) keys whose position ``pos[base * Npos + n] < lead`` (-1:
    an empty slot). Value codes have ``V_BITS`` bits (K/V bits may differ, e.g. K4V2).
    Code bytes are read once, contiguously ([BLOCK_N, BLOCK_D / ppb] tiles), and unpacked in registers."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_b = tl.arange(0, BLOCK_D // (8 // BITS))
    row_bytes = D * BITS // 8
    bmask = offs_b < row_bytes
    offs_vb = tl.arange(0, BLOCK_D // (8 // V_BITS))
    v_row_bytes = D * V_BITS // 8
    vbmask = offs_vb < v_row_bytes
    n_groups = Nq // GROUP
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        mask2 = nmask[:, None] & dmask[None, :]
        code_off = (base * Nq + offs_n[:, None]) * row_bytes + offs_b[None, :]
        bytes_mask = nmask[:, None] & bmask[None, :]
        kcode = _unpack(tl.load(kc_ptr + code_off, mask=bytes_mask, other=0).to(tl.int32), BITS).to(
            tl.float32
        )
        v_off = (base * Nq + offs_n[:, None]) * v_row_bytes + offs_vb[None, :]
        v_mask = nmask[:, None] & vbmask[None, :]
        vcode = _unpack(tl.load(vc_ptr + v_off, mask=v_mask, other=0).to(tl.int32), V_BITS).to(tl.float32)
        ks_off = (base * n_groups + offs_n[:, None] // GROUP) * D + offs_d[None, :]
        k = kcode * tl.load(ks_ptr + ks_off, mask=mask2, other=0).to(tl.float32) + tl.load(
            kz_ptr + ks_off, mask=mask2, other=0
        ).to(tl.float32)
        vs_off = (base * Nq + offs_n[:, None]) * (D // V_GROUP) + offs_d[None, :] // V_GROUP
        v = vcode * tl.load(vs_ptr + vs_off, mask=mask2, other=0).to(tl.float32) + tl.load(
            vz_ptr + vs_off, mask=mask2, other=0
        ).to(tl.float32)
        if HAS_POS:
            p = tl.load(pos_ptr + base * Npos + offs_n, mask=nmask, other=-1).to(tl.int64)
        else:
            p = offs_n.to(tl.int64)
        valid = nmask & (p >= lead)
        s = _dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s, float("-inf"))
        m, lsum, acc = _online_update(m, lsum, acc, s, v.to(q.dtype))
    return m, lsum, acc


@triton.jit
def _decode_quant_kernel(
    q_ptr,
    kc_ptr,
    ks_ptr,
    kz_ptr,
    vc_ptr,
    vs_ptr,
    vz_ptr,
    kt_ptr,
    vt_ptr,
    lead_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    Hg,
    Nq,
    Nt,
    qk_scale,
    D: tl.constexpr,
    G: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    V_GROUP: tl.constexpr,
    HAS_LEAD: tl.constexpr,
    V_BITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Split-K decode partials over quantized storage + fp tail; grid (B * Hg, NUM_SPLITS).

    Split s covers codes [s*C, (s+1)*C), C = ceil(ceil(Nq / NUM_SPLITS) / BLOCK_N) * BLOCK_N; the last
    split also covers the tail (positions Nq + t). Writes (m, lsum, acc) for the split reduce.
    """
    pid, b, h, split = _program_ids(Hg)
    q, lead, m, lsum, acc = _decode_init(
        q_ptr, lead_ptr, b, h * G, Hg * G, qk_scale, D, G, HAS_LEAD, BLOCK_G, BLOCK_D
    )
    lo, hi = _split_range(Nq, split, NUM_SPLITS, BLOCK_N)
    m, lsum, acc = _quant_tokens(
        q, m, lsum, acc, pid, lo, hi, Nq, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, lead, kc_ptr, 0, D,
        BITS, GROUP, V_GROUP, BLOCK_N, BLOCK_D, False, V_BITS,
    )  # fmt: skip
    if split == NUM_SPLITS - 1:
        m, lsum, acc = _dense_tokens(
            q, m, lsum, acc, pid, 0, Nt, Nt, kt_ptr, vt_ptr, kt_ptr, 1.0, 1.0, lead, Nq, 0, D, BLOCK_N,
            BLOCK_D,
        )  # fmt: skip
    _finish(m_ptr, l_ptr, acc_ptr, out_ptr, b, h, Hg, split, m, lsum, acc, D, G, BLOCK_G, BLOCK_D, NUM_SPLITS)


SOURCES = (_unpack, _quant_tokens, _decode_quant_kernel)


def check_quant_layout(
    prefix: str,
    t: dict,
    B: int,
    Hg: int,
    D: int,
    bits: int,
    group: int,
    v_group: int,
    device: torch.device,
    v_bits: int | None = None,
) -> int:
    """Validate a quantized group's tensors (``k_codes`` ... ``v_zero``); return Nq."""
    v_bits = bits if v_bits is None else v_bits
    for name, b in (("bits", bits), ("v_bits", v_bits)):
        if b not in BITS_ALLOWED:
            raise ValueError(f"{name}={b} not allowed; choose one of {list(BITS_ALLOWED)}")
        if D % (8 // b):
            raise ValueError(f"head_dim={D} must be a multiple of {8 // b} ({name}={b})")
    if D % v_group:
        raise ValueError(f"head_dim={D} must be a multiple of v_group={v_group}")
    kc = t["k_codes"]
    Nq = kc.shape[2] if kc.dim() == 4 else -1
    if Nq % group:
        raise ValueError(f"{prefix}k_codes: {Nq} quantized tokens, not a multiple of group={group}")
    row = D * bits // 8
    f16 = (torch.float16,)
    check_tensor(prefix + "k_codes", kc, (B, Hg, Nq, row), (torch.uint8,), device)
    check_tensor(prefix + "v_codes", t["v_codes"], (B, Hg, Nq, D * v_bits // 8), (torch.uint8,), device)
    check_tensor(prefix + "k_scale", t["k_scale"], (B, Hg, Nq // group, D), f16, device)
    check_tensor(prefix + "k_zero", t["k_zero"], (B, Hg, Nq // group, D), f16, device)
    check_tensor(prefix + "v_scale", t["v_scale"], (B, Hg, Nq, D // v_group), f16, device)
    check_tensor(prefix + "v_zero", t["v_zero"], (B, Hg, Nq, D // v_group), f16, device)
    return Nq


def decode_quant(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    *,
    bits,
    group,
    v_group,
    scale=None,
    lead=None,
    k_tail=None,
    v_tail=None,
    num_splits=None,
    kernels=None,
    v_bits=None,
):
    """Decode attention of ``q`` [B, Hq, 1, D] over a quantized group plus its fp tail (see module doc);
    ``v_bits`` (default ``bits``) are the value codes' bits.

    Returns [B, Hq, 1, D] in q's dtype. ``kernels`` = (main, reduce) jit functions loaded from the
    kernel cache (default: this module's).

    >>> out = decode_quant(q, kc, ks, kz, vc, vs, vz, bits=4, group=32, v_group=64)  # doctest: +SKIP
    """
    q3, four_d = split_q(q)
    B, Hq, D = q3.shape
    if q3.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q: dtype {q3.dtype} not in {list(FLOAT_DTYPES)}")
    Hg = k_codes.shape[1] if k_codes.dim() == 4 else -1
    if Hg <= 0 or Hq % Hg:
        raise ValueError(f"k_codes: expected [B, Hg, Nq, D*bits/8] with Hq={Hq} a multiple of Hg")
    G = Hq // Hg
    dev = q3.device
    tensors = dict(
        k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, v_codes=v_codes, v_scale=v_scale, v_zero=v_zero
    )
    v_bits = bits if v_bits is None else v_bits
    Nq = check_quant_layout("", tensors, B, Hg, D, bits, group, v_group, dev, v_bits)
    lead_t, has_lead = lead_arg(lead, B, dev)
    kt, vt, Nt = tail_args(k_tail, v_tail, B, Hg, D, dev)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s, out, parts = decode_buffers(q3, Nq + Nt, D, G, B, Hg, dev, num_splits)
    main, red = kernels or (_decode_quant_kernel, None)
    main[(B * Hg, s.num_splits)](
        q3,
        k_codes,
        k_scale,
        k_zero,
        v_codes,
        v_scale,
        v_zero,
        kt,
        vt,
        lead_t,
        *parts,
        out,
        Hg,
        Nq,
        Nt,
        scale * LOG2E,
        D=D,
        G=G,
        BITS=bits,
        GROUP=group,
        V_GROUP=v_group,
        HAS_LEAD=has_lead,
        V_BITS=v_bits,
        **s.launch_meta(),
    )
    reduce_splits(parts, out, Hg, D, G, s, red)
    return out[:, :, None] if four_d else out
