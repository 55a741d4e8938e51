"""Pure-torch references of every kernel in this package (the ``torch`` backend, and what tests and
``validate=True`` compare the kernels with). Layouts: see the kernel modules' docstrings.

Quantization and packing are those of :mod:`kvcompile.strategies._quant_ref` (KIVI, Liu et al.
2024, arXiv:2402.02750), the definition the strategies' stores use; this module only adds the
left-padding mask for key groups and the attention references.
"""

from __future__ import annotations

import math

import torch

from ..strategies import _quant_ref as qr
from ..strategies.base import reference_attention

pack, unpack = qr.pack, qr.unpack
dequantize_keys, dequantize_values = qr.dequantize_keys, qr.dequantize_values


def quantize_keys(k: torch.Tensor, bits: int, group: int, lead: torch.Tensor | None = None, start: int = 0):
    """Keys [B, H, n, D] -> (codes uint8 [B, H, n, D*bits/8], scale, zero float16 [B, H, n/group, D]);
    token t (cache slot ``start + t``) is left padding, excluded from min/max, when below ``lead[b]``."""
    mask = None
    if lead is not None:
        slot = start + torch.arange(k.shape[2], device=k.device)
        mask = (slot[None, :] >= lead[:, None])[:, None, :, None]
    return qr.quantize_keys(k, bits, group, mask=mask)


def quantize_values(v: torch.Tensor, bits: int, v_group: int):
    """Values [B, H, n, D] -> (codes uint8 [B, H, n, D*bits/8], scale, zero float16 [B, H, n, D/v_group])."""
    return qr.quantize_values(v, bits, v_group)


def _attend(q, k, v, key_ok, scale):
    """Decode attention of q [B, Hq, 1, D] over k/v [B, Hg, N, D] with key_ok [B, Hg, N] (float32 math)."""
    out, _ = reference_attention(q.float(), k.float(), v.float(), key_ok, scale)
    return out.to(q.dtype)


def _with_tail(k, v, ok, k_new, v_new, tail_ok):
    if k_new is None:
        return k, v, ok
    return (
        torch.cat([k.float(), k_new.float()], 2),
        torch.cat([v.float(), v_new.float()], 2),
        torch.cat([ok, tail_ok], 2),
    )


def _lead_mask(positions: torch.Tensor, lead, batch: int) -> torch.Tensor:
    """[B, H, N] bool from positions [H, N] or [B, H, N]."""
    p = positions if positions.dim() == 3 else positions.expand(batch, *positions.shape)
    if lead is None:
        return torch.ones(p.shape, dtype=torch.bool, device=p.device)
    return p >= lead.view(-1, 1, 1)


def _tail_ok(k_new, pos0, lead, batch, heads):
    if k_new is None:
        return None
    pos = pos0 + torch.arange(k_new.shape[2], device=k_new.device)
    return _lead_mask(pos.expand(heads, -1), lead, batch)


def decode_full(q, k, v, *, scale=None, lead=None, k_new=None, v_new=None):
    """Reference of :func:`kvcompile.codegen.decode_compact.decode_full`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, H, N, _ = k.shape
    ok = _lead_mask(torch.arange(N, device=k.device).expand(H, N), lead, B)
    k, v, ok = _with_tail(k, v, ok, k_new, v_new, _tail_ok(k_new, N, lead, B, H))
    return _attend(q, k, v, ok, scale)


def fp8_dequant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [B, H, N, D] from float8_e4m3fn storage (or its uint8 bits) and scales [B, H]."""
    if x.dtype == torch.uint8:
        x = x.view(torch.float8_e4m3fn)
    return x.float() * scale[:, :, None, None]


def decode_fp8(q, k, v, k_scale, v_scale, *, scale=None, lead=None, k_new=None, v_new=None):
    """Reference of :func:`kvcompile.codegen.decode_compact.decode_fp8`."""
    return decode_full(
        q, fp8_dequant(k, k_scale), fp8_dequant(v, v_scale), scale=scale, lead=lead, k_new=k_new, v_new=v_new
    )


def decode_compact(q, k, v, pos, *, scale=None, lead=None, k_new=None, v_new=None):
    """Reference of :func:`kvcompile.codegen.decode_compact.decode_compact`: keys with ``pos < lead``
    (``pos < 0`` without lead: empty slots) are masked; new tokens never are."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, H = k.shape[:2]
    ok = pos.long() >= (0 if lead is None else lead.view(-1, 1, 1))  # empty slots carry pos = -1
    tail = None if k_new is None else torch.ones(B, H, k_new.shape[2], dtype=torch.bool, device=k.device)
    k, v, ok = _with_tail(k, v, ok, k_new, v_new, tail)
    return _attend(q, k, v, ok, scale)


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
    v_bits=None,
):
    """Reference of :func:`kvcompile.codegen.decode_quant.decode_quant`: dequantize, then attend over
    the codes followed by the fp tail (residual and new tokens; tail token t sits at ``Nq + t``);
    ``v_bits`` (default ``bits``) are the value codes' bits."""
    k = dequantize_keys(k_codes, k_scale, k_zero, bits, group)
    v = dequantize_values(v_codes, v_scale, v_zero, bits if v_bits is None else v_bits, v_group)
    return decode_full(q, k, v, scale=scale, lead=lead, k_new=k_tail, v_new=v_tail)


def decode_compact_scored(q, k, v, pos, *, scale=None, lead=None, k_new=None, v_new=None):
    """Reference of :func:`kvcompile.codegen.decode_compact.decode_compact_scored`: (out, mass), mass
    [B, Hg, N + T] = softmax probabilities summed over the G query heads of each KV head."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, H = k.shape[:2]
    ok = pos.long() >= (0 if lead is None else lead.view(-1, 1, 1))
    tail = None if k_new is None else torch.ones(B, H, k_new.shape[2], dtype=torch.bool, device=k.device)
    k, v, ok = _with_tail(k, v, ok, k_new, v_new, tail)
    out, probs = reference_attention(q.float(), k.float(), v.float(), ok, scale, return_probs=True)
    mass = probs.reshape(B, H, -1, probs.shape[-1]).sum(2)
    return out.to(q.dtype), mass
