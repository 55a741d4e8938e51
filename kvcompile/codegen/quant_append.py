"""Quantize-on-append: the flush of full residual groups into packed KIVI storage, K and V in one launch.

Input: the oldest ``n`` residual tokens ``k``, ``v`` [B, Hg, n, D] (n a multiple of ``group``).
Output (layout of :mod:`kvcompile.codegen.decode_quant`): ``k_codes``/``v_codes`` uint8
[B, Hg, n, D*bits/8], ``k_scale``/``k_zero`` float16 [B, Hg, n/group, D] (per channel over ``group``
tokens), ``v_scale``/``v_zero`` float16 [B, Hg, n, D/v_group] (per token over ``v_group`` channels).
Formula: :mod:`kvcompile.codegen.reference` (KIVI, Liu et al. 2024, arXiv:2402.02750).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FLOAT_DTYPES, check_tensor, lead_arg
from .decode_quant import BITS_ALLOWED


@triton.jit
def _quant_codes(x, mn, mx, QMAX: tl.constexpr):
    """scale = fp16((mx - mn) / QMAX), zero = fp16(mn), code = clamp(round((x - zero) / scale), 0, QMAX)
    (round half to even; code 0 where scale == 0). Returns (code int32, scale f32, zero f32), broadcast
    like the inputs."""
    scale = ((mx - mn) / QMAX).to(tl.float16).to(tl.float32)
    zero = mn.to(tl.float16).to(tl.float32)
    y = (x - zero) / tl.where(scale > 0, scale, 1.0)
    f = tl.floor(y)
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    code = tl.where((y - f > 0.5) | ((y - f == 0.5) & odd), f + 1.0, f)  # round half to even (torch.round)
    code = tl.minimum(tl.maximum(code, 0.0), QMAX * 1.0)
    code = tl.where(scale > 0, code, 0.0)
    return code.to(tl.int32), scale, zero


@triton.jit
def _group_tile(
    x_ptr,
    row,
    grp,
    n,
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Tokens [grp*GROUP, (grp+1)*GROUP) of ``row`` of ``x`` [.., n, D] as a float32 tile
    [BLOCK_T, BLOCK_B, 8/BITS] (channel = byte*ppb + j; 0 outside). Returns (x, tok, chan, mask)."""
    PPB: tl.constexpr = 8 // BITS
    ROW: tl.constexpr = D * BITS // 8
    offs_t = tl.arange(0, BLOCK_T)
    offs_b = tl.arange(0, BLOCK_B)
    offs_j = tl.arange(0, PPB)
    tok = grp * GROUP + offs_t[:, None, None]
    chan = offs_b[None, :, None] * PPB + offs_j[None, None, :]
    mask = (offs_t[:, None, None] < GROUP) & (offs_b[None, :, None] < ROW)
    x = tl.load(x_ptr + (row * n + tok) * D + chan, mask=mask, other=0.0).to(tl.float32)
    return x, tok, chan, mask


@triton.jit
def _store_packed(
    c_ptr,
    code,
    row,
    grp,
    n,
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Pack a [BLOCK_T, BLOCK_B, 8/BITS] code tile along its last axis (``sum_j code << BITS*j``) and store
    the bytes of tokens [grp*GROUP, (grp+1)*GROUP) of ``row`` into ``c`` [.., n, D*BITS/8]."""
    ROW: tl.constexpr = D * BITS // 8
    offs_t = tl.arange(0, BLOCK_T)
    offs_b = tl.arange(0, BLOCK_B)
    offs_j = tl.arange(0, 8 // BITS)
    packed = tl.sum(code << (offs_j * BITS)[None, None, :], 2)
    byte_mask = (offs_t[:, None] < GROUP) & (offs_b[None, :] < ROW)
    tl.store(
        c_ptr + (row * n + grp * GROUP + offs_t[:, None]) * ROW + offs_b[None, :],
        packed.to(tl.uint8),
        mask=byte_mask,
    )


@triton.jit
def _quant_keys_tile(
    k_ptr,
    kc_ptr,
    ks_ptr,
    kz_ptr,
    lead_ptr,
    row,
    grp,
    n,
    start,
    Hg,
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_LEAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Keys of tokens [grp*GROUP, (grp+1)*GROUP) of ``row``, per channel: min/max over the real tokens
    (cache slot ``start + t >= lead[b]``; no real token: scale = zero = 0), codes packed along channels."""
    ROW: tl.constexpr = D * BITS // 8
    offs_b = tl.arange(0, BLOCK_B)
    x, tok, chan, mask = _group_tile(k_ptr, row, grp, n, D, BITS, GROUP, BLOCK_T, BLOCK_B)
    real = mask
    if HAS_LEAD:
        real = mask & (start + tok >= tl.load(lead_ptr + row // Hg))
    mn = tl.min(tl.where(real, x, float("inf")), 0)  # [BLOCK_B, PPB]: per channel over tokens
    mx = tl.max(tl.where(real, x, float("-inf")), 0)
    mn = tl.where(mn == float("inf"), 0.0, mn)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    cmask = offs_b[None, :, None] < ROW  # [1, BLOCK_B, 1]
    code, scale, zero = _quant_codes(
        x, tl.where(cmask, mn[None, :, :], 0.0), tl.where(cmask, mx[None, :, :], 0.0), (1 << BITS) - 1
    )
    _store_packed(kc_ptr, code, row, grp, n, D, BITS, GROUP, BLOCK_T, BLOCK_B)
    sz_off = (row * (n // GROUP) + grp) * D + chan
    tl.store(ks_ptr + sz_off, scale.to(tl.float16), mask=cmask & (chan < D))
    tl.store(kz_ptr + sz_off, zero.to(tl.float16), mask=cmask & (chan < D))


@triton.jit
def _quant_values_tile(
    v_ptr,
    vc_ptr,
    vs_ptr,
    vz_ptr,
    row,
    grp,
    n,
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    V_GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Values of tokens [grp*GROUP, (grp+1)*GROUP) of ``row``, per token over V_GROUP channels."""
    PPB: tl.constexpr = 8 // BITS
    offs_t = tl.arange(0, BLOCK_T)
    x, _, chan, mask = _group_tile(v_ptr, row, grp, n, D, BITS, GROUP, BLOCK_T, BLOCK_B)
    mn = tl.zeros([BLOCK_T, BLOCK_B, PPB], tl.float32)
    mx = tl.zeros([BLOCK_T, BLOCK_B, PPB], tl.float32)
    for gi in tl.static_range(D // V_GROUP):
        in_g = mask & (chan // V_GROUP == gi)
        g_mn = tl.min(tl.min(tl.where(in_g, x, float("inf")), 2), 1)  # [BLOCK_T]: per token
        g_mx = tl.max(tl.max(tl.where(in_g, x, float("-inf")), 2), 1)
        mn = tl.where(in_g, g_mn[:, None, None], mn)
        mx = tl.where(in_g, g_mx[:, None, None], mx)
        sz_off = (row * n + grp * GROUP + offs_t) * (D // V_GROUP) + gi
        tl.store(vs_ptr + sz_off, ((g_mx - g_mn) / ((1 << BITS) - 1)).to(tl.float16), mask=offs_t < GROUP)
        tl.store(vz_ptr + sz_off, g_mn.to(tl.float16), mask=offs_t < GROUP)
    code, scale, zero = _quant_codes(x, mn, mx, (1 << BITS) - 1)
    _store_packed(vc_ptr, code, row, grp, n, D, BITS, GROUP, BLOCK_T, BLOCK_B)


@triton.jit
def _quant_pack_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    ks_ptr,
    kz_ptr,
    vc_ptr,
    vs_ptr,
    vz_ptr,
    lead_ptr,
    n,
    start,
    Hg,
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    V_GROUP: tl.constexpr,
    HAS_LEAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
    V_BITS: tl.constexpr,
    V_BLOCK_B: tl.constexpr,
):
    """Grid (B * Hg, n / GROUP, 2): program (row, g, 0) quantizes keys of tokens [g*GROUP, (g+1)*GROUP)
    per channel; program (row, g, 1) their values per token over V_GROUP channels with V_BITS-bit codes
    (one launch per flush).
    Tiles are [BLOCK_T tokens, BLOCK_B bytes, 8/BITS channels per byte]: channel = byte*ppb + j, so
    packing is ``sum_j code << BITS*j`` over the last axis."""
    row = tl.program_id(0)
    grp = tl.program_id(1)
    if tl.program_id(2) == 0:
        _quant_keys_tile(
            k_ptr, kc_ptr, ks_ptr, kz_ptr, lead_ptr, row, grp, n, start, Hg, D, BITS, GROUP, HAS_LEAD,
            BLOCK_T, BLOCK_B,
        )  # fmt: skip
    else:
        _quant_values_tile(
            v_ptr, vc_ptr, vs_ptr, vz_ptr, row, grp, n, D, V_BITS, GROUP, V_GROUP, BLOCK_T, V_BLOCK_B
        )


SOURCES = (_quant_codes, _group_tile, _store_packed, _quant_keys_tile, _quant_values_tile, _quant_pack_kernel)


def quantize_append(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bits: int,
    group: int,
    v_group: int,
    lead: torch.Tensor | None = None,
    start: int = 0,
    kernel=None,
    v_bits: int | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize ``k``, ``v`` [B, Hg, n, D] (n a multiple of ``group``) into packed KIVI storage in one
    launch; returns ``{"k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"}`` for the new
    tokens (the store appends them to its codes along the token axis). ``lead`` [B] int64 and ``start``
    (cache slot of the first token) exclude left-padding keys from the key groups' min/max.

    >>> new = quantize_append(k_old, v_old, bits=4, group=32, v_group=64)  # doctest: +SKIP
    """
    v_bits = bits if v_bits is None else v_bits
    for b in (bits, v_bits):
        if b not in BITS_ALLOWED:
            raise ValueError(f"bits={b} not allowed; choose one of {list(BITS_ALLOWED)}")
    if k.dim() != 4:
        raise ValueError(f"k: expected [B, Hg, n, D], got shape {tuple(k.shape)}")
    B, Hg, n, D = k.shape
    k, v = k.contiguous(), v.contiguous()  # a flush reads a slice of the residual (at most a few groups)
    check_tensor("k", k, (B, Hg, n, D), FLOAT_DTYPES, k.device)
    check_tensor("v", v, (B, Hg, n, D), FLOAT_DTYPES, k.device)
    if group < 1 or n % group:
        raise ValueError(f"group={group}: the {n} tokens to flush must be a positive multiple of it")
    if v_group < 1 or D % v_group or D % (8 // bits) or D % (8 // v_bits):
        raise ValueError(f"v_group={v_group}: head_dim {D} must be a multiple of it and of {8 // min(bits, v_bits)}")
    row, v_row = D * bits // 8, D * v_bits // 8
    dev = k.device
    out = {
        "k_codes": torch.empty(B, Hg, n, row, dtype=torch.uint8, device=dev),
        "k_scale": torch.empty(B, Hg, n // group, D, dtype=torch.float16, device=dev),
        "k_zero": torch.empty(B, Hg, n // group, D, dtype=torch.float16, device=dev),
        "v_codes": torch.empty(B, Hg, n, v_row, dtype=torch.uint8, device=dev),
        "v_scale": torch.empty(B, Hg, n, D // v_group, dtype=torch.float16, device=dev),
        "v_zero": torch.empty(B, Hg, n, D // v_group, dtype=torch.float16, device=dev),
    }
    if n == 0:
        return out
    lead_t, has_lead = lead_arg(lead, B, dev)
    kernel = kernel or _quant_pack_kernel
    kernel[(B * Hg, n // group, 2)](
        k,
        v,
        out["k_codes"],
        out["k_scale"],
        out["k_zero"],
        out["v_codes"],
        out["v_scale"],
        out["v_zero"],
        lead_t,
        n,
        start,
        Hg,
        D=D,
        BITS=bits,
        GROUP=group,
        V_GROUP=v_group,
        HAS_LEAD=has_lead,
        BLOCK_T=triton.next_power_of_2(group),
        BLOCK_B=triton.next_power_of_2(row),
        V_BITS=v_bits,
        V_BLOCK_B=triton.next_power_of_2(v_row),
        num_warps=4,
    )
    return out
