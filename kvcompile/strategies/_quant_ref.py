"""Pure-torch reference of KIVI's asymmetric group quantization and its uint8 packing.

This is the definition the Triton kernels (``kvcompile.codegen``) are tested against.

Quantization (Liu et al., KIVI, arXiv:2402.02750, eq. 1), per group of values ``x``::

    zero  = min(x)                       (stored as float16)
    scale = (max(x) - min(x)) / (2^bits - 1)   (stored as float16; 0 when the group is constant)
    code  = clamp(round((x - zero) / scale), 0, 2^bits - 1)
    x̂     = code * scale + zero

Codes are computed against the float16-rounded ``scale``/``zero`` the store keeps, so the
reconstruction error is at most ``scale / 2`` plus float16 rounding of ``zero``.

Packing along the last dimension (head_dim): with ``ppb = 8 // bits`` codes per byte, byte ``i``
holds channels ``i*ppb + j`` (j = 0..ppb-1) at bit offset ``bits*j`` (lowest bits = first channel).
"""

from __future__ import annotations

import torch

BITS = (8, 4, 2)


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} not allowed; choose one of {list(BITS)}")
    return 8 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` (values < 2**bits) into ``[..., D * bits // 8]`` uint8."""
    ppb = _check_bits(bits)
    D = codes.shape[-1]
    if D % ppb:
        raise ValueError(f"head_dim={D} must be divisible by {ppb} to pack {bits}-bit codes")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], D // ppb, ppb)
    shifts = torch.arange(ppb, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., D * bits // 8]`` uint8 -> ``[..., D]`` uint8 codes."""
    ppb = _check_bits(bits)
    if ppb == 1:
        return packed
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    c = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * ppb)


def _grouped(x: torch.Tensor, dim: int, group: int) -> tuple[torch.Tensor, int]:
    """View ``x`` with ``dim`` split into (n_groups, group); returns the view and the group axis."""
    dim = dim % x.dim()
    n = x.shape[dim]
    if n % group:
        raise ValueError(f"group={group} must divide the quantized length {n}")
    return x.reshape(*x.shape[:dim], n // group, group, *x.shape[dim + 1 :]), dim + 1


def quantize_groups(
    x: torch.Tensor, bits: int, dim: int, group: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of ``x`` in groups of ``group`` consecutive entries along ``dim``.

    Keys (per channel over G tokens): ``dim=-2, group=G`` -> scale/zero ``[..., N/G, D]``.
    Values (per token over channel groups): ``dim=-1, group=v_group`` -> scale/zero ``[..., N, D/v_group]``.
    ``mask`` (broadcastable to ``x``, True = real) excludes entries such as padding from min/max;
    a group with no real entry gets scale 0 and zero 0.
    Returns (codes uint8 shaped like ``x``, unpacked; scale float16; zero float16).
    """
    _check_bits(bits)
    xf = x.float()
    g, ax = _grouped(xf, dim, group)
    if mask is None:
        lo, hi = g.amin(dim=ax), g.amax(dim=ax)
    else:
        mg, _ = _grouped(mask.expand_as(xf), dim, group)
        lo = torch.where(mg, g, torch.inf).amin(dim=ax)
        hi = torch.where(mg, g, -torch.inf).amax(dim=ax)
        empty = ~torch.isfinite(lo)
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    levels = (1 << bits) - 1
    zero = lo.half()
    scale = ((hi - lo) / levels).half()
    s32 = scale.float()
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    codes = torch.round((g - zero.float().unsqueeze(ax)) / safe.unsqueeze(ax)).clamp_(0, levels)
    codes = torch.where(s32.unsqueeze(ax) > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.uint8).reshape(x.shape), scale, zero


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dim: int, group: int
) -> torch.Tensor:
    """``x̂ = code * scale + zero`` (float32) for unpacked ``codes`` grouped as in :func:`quantize_groups`."""
    g, ax = _grouped(codes.float(), dim, group)
    return torch.addcmul(zero.float().unsqueeze(ax), g, scale.float().unsqueeze(ax)).reshape(codes.shape)


def quantize_keys(k: torch.Tensor, bits: int, group: int, mask: torch.Tensor | None = None):
    """KIVI keys [B, H, N, D] (N % group == 0): per-channel groups of ``group`` tokens, packed.

    Returns (codes uint8 [B, H, N, D*bits/8], scale float16 [B, H, N/group, D], zero same).
    """
    codes, scale, zero = quantize_groups(k, bits, dim=-2, group=group, mask=mask)
    return pack(codes, bits), scale, zero


def quantize_values(v: torch.Tensor, bits: int, v_group: int):
    """KIVI values [B, H, N, D]: per-token groups of ``v_group`` channels, packed.

    Returns (codes uint8 [B, H, N, D*bits/8], scale float16 [B, H, N, D/v_group], zero same).
    """
    codes, scale, zero = quantize_groups(v, bits, dim=-1, group=v_group)
    return pack(codes, bits), scale, zero


def dequantize_keys(packed, scale, zero, bits: int, group: int) -> torch.Tensor:
    """float32 [B, H, N, D] from :func:`quantize_keys` output."""
    return dequantize(unpack(packed, bits), scale, zero, dim=-2, group=group)


def dequantize_values(packed, scale, zero, bits: int, v_group: int) -> torch.Tensor:
    """float32 [B, H, N, D] from :func:`quantize_values` output."""
    return dequantize(unpack(packed, bits), scale, zero, dim=-1, group=v_group)
