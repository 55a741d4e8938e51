"""One fused decode-attention launch per layer whose KV heads use different storage formats.

A layer's head groups (each a set of KV heads sharing a strategy, see ``runtime.cache.group_heads``)
become *slots*: per slot, a constexpr spec ``(format id, bits, group, v_group, v_bits)``, a tuple of ten
storage tensors, an fp tail (residual and/or new tokens) and four ints ``(Hg, N, Nt, tail_pos0)``.
A per-KV-head table ``[Hkv, 2]`` int32 gives each layer KV head its ``(slot, head within the group)``.
Program ``(b * Hkv + h, split)`` loads the table entry and branches on the slot (a uniform branch per
program; every branch is compiled in, so the layer costs one launch whatever its mix), then runs the
same per-format token loops as the single-format kernels (:func:`_quant_tokens`, :func:`_dense_tokens`)
and writes split partials that the shared reduce merges directly into query-head order.

Slot tensors by format (ten per slot, unused ones repeat the first): full ``(k, v)``; fp8 ``(k bits,
v bits, k_scale, v_scale)``; compact ``(k, v, pos)``; quant ``(k_codes, k_scale, k_zero, v_codes,
v_scale, v_zero)``; quant_pos (a composition: selection + KIVI) the quant six + ``pos`` [B, Hg, Nq+Nr]
(positions of codes then residual, -1 = empty); mikv the quant_pos seven of its low-bit store + the
selected full-precision ``k, v, pos``. Slot ints: ``(Hg, N, Nt, tail_pos0, Npos, N_hi)``; tails
``(k_tail, v_tail, tail_pos)`` (quant_pos/mikv: tail tokens are masked by ``tail_pos``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    FMT_COMPACT,
    FMT_FP8,
    FMT_MIKV,
    FMT_QUANT,
    FMT_QUANT_POS,
    FORMAT_IDS,
    LOG2E,
    _decode_init,
    _finish,
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
from .decode_compact import ALWAYS_VALID, _dense_tokens
from .decode_quant import _quant_tokens, check_quant_layout
from .formats import FORMATS, MAX_SLOT_TENSORS


@triton.jit
def _decode_mixed_kernel(
    q_ptr,
    table_ptr,
    slots,
    tails,
    ints,
    lead_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    Hkv,
    qk_scale,
    SPEC: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    HAS_LEAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Split-K decode partials for every KV head of a layer; grid (B * Hkv, NUM_SPLITS).

    For layer KV head h with ``(slot, hg) = table[h]``: storage row ``b * Hg[slot] + hg``; split s covers
    main tokens [s*C, (s+1)*C), C = ceil(ceil(N[slot] / NUM_SPLITS) / BLOCK_N) * BLOCK_N, the last split
    also the slot's tail. Query rows h*G .. h*G+G-1; partial row (b * Hkv + h) * NUM_SPLITS + s.
    """
    _, b, h, split = _program_ids(Hkv)
    q, lead, m, lsum, acc = _decode_init(
        q_ptr, lead_ptr, b, h * G, Hkv * G, qk_scale, D, G, HAS_LEAD, BLOCK_G, BLOCK_D
    )
    slot = tl.load(table_ptr + 2 * h)
    hg = tl.load(table_ptr + 2 * h + 1)
    for i in tl.static_range(NUM_SLOTS):
        if slot == i:
            t = slots[i]
            base = b * ints[i][0] + hg
            n_main = ints[i][1]
            lo, hi = _split_range(n_main, split, NUM_SPLITS, BLOCK_N)
            if SPEC[i][0] >= 3:  # quant, quant_pos, mikv (its low-bit store)
                m, lsum, acc = _quant_tokens(
                    q, m, lsum, acc, base, lo, hi, n_main, t[0], t[1], t[2], t[3], t[4], t[5], lead, t[6],
                    ints[i][4], D, SPEC[i][1], SPEC[i][2], SPEC[i][3], BLOCK_N, BLOCK_D, SPEC[i][0] >= 4,
                    SPEC[i][4],
                )  # fmt: skip
                if SPEC[i][0] == 5:  # noqa: SIM102 - a constexpr branch around a runtime one
                    if split == NUM_SPLITS - 1:  # MiKV's full-precision (selected) tokens
                        m, lsum, acc = _dense_tokens(
                            q, m, lsum, acc, base, 0, ints[i][5], ints[i][5], t[7], t[8], t[9], 1.0, 1.0, lead,
                            0, 2, D, BLOCK_N, BLOCK_D,
                        )  # fmt: skip
            else:
                k_scale = 1.0
                v_scale = 1.0
                if SPEC[i][0] == 1:
                    k_scale = tl.load(t[2] + base)
                    v_scale = tl.load(t[3] + base)
                m, lsum, acc = _dense_tokens(
                    q, m, lsum, acc, base, lo, hi, n_main, t[0], t[1], t[2], k_scale, v_scale, lead, 0,
                    SPEC[i][0], D, BLOCK_N, BLOCK_D,
                )  # fmt: skip
            if split == NUM_SPLITS - 1:
                n_tail = ints[i][2]
                m, lsum, acc = _dense_tokens(
                    q, m, lsum, acc, base, 0, n_tail, n_tail, tails[i][0], tails[i][1], tails[i][2], 1.0, 1.0,
                    lead, ints[i][3], 2 * (SPEC[i][0] >= 4), D, BLOCK_N, BLOCK_D,
                )  # fmt: skip
    _finish(
        m_ptr, l_ptr, acc_ptr, out_ptr, b, h, Hkv, split, m, lsum, acc, D, G, BLOCK_G, BLOCK_D, NUM_SPLITS
    )


SOURCES = (_decode_mixed_kernel,)

_SLOT_TENSORS = {f.fid: f.tensors for f in FORMATS.values()}


@dataclasses.dataclass(frozen=True)
class GroupView:
    """What the mixed launch needs of one head group: its format, its layer KV heads (in storage
    order), its storage tensors (names as in the format's layout), quant parameters, and its fp tail
    ``k_tail``/``v_tail`` [B, Hg, T, D] whose token t sits at position ``tail_pos0 + t``
    (default: right after the main tokens; never masked for compacted storage)."""

    fmt: str
    kv_heads: tuple[int, ...]
    tensors: Mapping[str, torch.Tensor]
    bits: int = 0
    group: int = 0
    v_group: int = 0
    v_bits: int = 0  # 0: = bits
    k_tail: torch.Tensor | None = None
    v_tail: torch.Tensor | None = None
    tail_pos0: int | None = None
    tail_pos: torch.Tensor | None = None  # [B, Hg, T] positions of the tail (quant_pos, mikv)

    def __post_init__(self) -> None:
        if self.fmt not in FORMAT_IDS:
            raise ValueError(f"fmt={self.fmt!r} not allowed; choose one of {list(FORMAT_IDS)}")
        missing = [n for n in _SLOT_TENSORS[FORMAT_IDS[self.fmt]] if n not in self.tensors]
        if missing:
            raise ValueError(f"{self.fmt} group {self.kv_heads}: missing tensors {missing}")

    @property
    def spec(self) -> tuple[int, int, int, int, int]:
        """The slot's constexpr spec (format id, bits, group, v_group, v_bits)."""
        return (FORMAT_IDS[self.fmt], self.bits, self.group, self.v_group, self.v_bits or self.bits)


def _slot_args(g: GroupView, B: int, D: int, dev: torch.device):
    fid = FORMAT_IDS[g.fmt]
    Hg = len(g.kv_heads)
    t = dict(g.tensors)
    npos = n_hi = 0
    if fid in (FMT_QUANT, FMT_QUANT_POS, FMT_MIKV):
        n = check_quant_layout(
            f"{g.fmt}{g.kv_heads}.", t, B, Hg, D, g.bits, g.group, g.v_group, dev, g.v_bits or g.bits
        )
        if fid != FMT_QUANT:
            npos = t["pos"].shape[-1]
            check_tensor(f"{g.fmt}{g.kv_heads}.pos", t["pos"], (B, Hg, npos), (torch.int32, torch.int64), dev)
            if npos < n:
                raise ValueError(f"{g.fmt}{g.kv_heads}.pos: {npos} positions for {n} quantized tokens")
        if fid == FMT_MIKV:
            n_hi = t["hi_k"].shape[2] if t["hi_k"].dim() == 4 else -1
            for name in ("hi_k", "hi_v"):
                check_tensor(f"mikv{g.kv_heads}.{name}", t[name], (B, Hg, n_hi, D), FLOAT_DTYPES, dev)
            check_tensor(f"mikv{g.kv_heads}.hi_pos", t["hi_pos"], (B, Hg, n_hi), (torch.int32, torch.int64), dev)
    else:
        if fid == FMT_FP8:
            t["k"], t["v"] = (
                x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x for x in (t["k"], t["v"])
            )
        n = t["k"].shape[2] if t["k"].dim() == 4 else -1
        dtypes = (torch.uint8,) if fid == FMT_FP8 else FLOAT_DTYPES
        check_tensor(f"{g.fmt}{g.kv_heads}.k", t["k"], (B, Hg, n, D), dtypes, dev)
        check_tensor(f"{g.fmt}{g.kv_heads}.v", t["v"], (B, Hg, n, D), dtypes, dev)
        if fid == FMT_FP8:
            for name in ("k_scale", "v_scale"):
                check_tensor(f"fp8{g.kv_heads}.{name}", t[name], (B, Hg), (torch.float32,), dev)
        if fid == FMT_COMPACT:
            check_tensor(f"compact{g.kv_heads}.pos", t["pos"], (B, Hg, n), (torch.int32, torch.int64), dev)
    names = _SLOT_TENSORS[fid]
    tensors = tuple(t[names[i]] if i < len(names) else t[names[0]] for i in range(MAX_SLOT_TENSORS))
    kt, vt, nt = tail_args(g.k_tail, g.v_tail, B, Hg, D, dev)
    tail_pos = kt
    if fid in (FMT_QUANT_POS, FMT_MIKV):
        if g.tail_pos is None or tuple(g.tail_pos.shape) != (B, Hg, nt):
            raise ValueError(f"{g.fmt}{g.kv_heads}.tail_pos: expected [{B}, {Hg}, {nt}] positions of the tail")
        tail_pos = g.tail_pos.to(device=dev).contiguous()
    pos0 = g.tail_pos0 if g.tail_pos0 is not None else (ALWAYS_VALID if fid == FMT_COMPACT else n)
    return tensors, (kt, vt, tail_pos), (Hg, n, nt, pos0, npos, n_hi)


def head_table(groups: Sequence[GroupView], num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """[Hkv, 2] int32: (slot, head within its group) of every layer KV head; each head exactly once."""
    table = torch.full((num_kv_heads, 2), -1, dtype=torch.int32)
    for s, g in enumerate(groups):
        for j, h in enumerate(g.kv_heads):
            if not 0 <= h < num_kv_heads or table[h, 0] >= 0:
                raise ValueError(f"kv_heads: head {h} out of range or in two groups")
            table[h] = torch.tensor([s, j], dtype=torch.int32)
    if (table[:, 0] < 0).any():
        raise ValueError(
            f"kv_heads: heads {(table[:, 0] < 0).nonzero().flatten().tolist()} belong to no group"
        )
    return table.to(device)


def decode_mixed(
    q: torch.Tensor,
    groups: Sequence[GroupView],
    *,
    scale: float | None = None,
    lead: torch.Tensor | None = None,
    num_splits: int | None = None,
    kernels=None,
) -> torch.Tensor:
    """Decode attention of a whole layer in one launch (+ the split reduce).

    ``q`` [B, Hkv*G, 1, D] in query-head order (query head j reads layer KV head j // G); ``groups``
    cover every layer KV head once. Returns [B, Hkv*G, 1, D] in q's dtype.

    >>> out = decode_mixed(q, [GroupView("quant", (0, 2), qt, bits=4, group=32, v_group=64),
    ...                        GroupView("full", (1,), {"k": k, "v": v})])  # doctest: +SKIP
    """
    q3, four_d = split_q(q)
    B, Hq, D = q3.shape
    if not groups:
        raise ValueError("groups: at least one head group is required")
    Hkv = sum(len(g.kv_heads) for g in groups)
    if Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of the {Hkv} KV heads of the groups")
    if q3.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q: dtype {q3.dtype} not in {list(FLOAT_DTYPES)}")
    G = Hq // Hkv
    dev = q3.device
    table = head_table(groups, Hkv, dev)
    args = [_slot_args(g, B, D, dev) for g in groups]
    lead_t, has_lead = lead_arg(lead, B, dev)
    longest = max(a[2][1] + a[2][2] + a[2][5] for a in args)
    s, out, parts = decode_buffers(q3, longest, D, G, B, Hkv, dev, num_splits)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    main, red = kernels or (_decode_mixed_kernel, None)
    main[(B * Hkv, s.num_splits)](
        q3, table, tuple(a[0] for a in args), tuple(a[1] for a in args), tuple(a[2] for a in args), lead_t,
        *parts, out, Hkv, scale * LOG2E, SPEC=tuple(g.spec for g in groups), NUM_SLOTS=len(groups), D=D, G=G,
        HAS_LEAD=has_lead, **s.launch_meta(),
    )  # fmt: skip
    reduce_splits(parts, out, Hkv, D, G, s, red)
    return out[:, :, None] if four_d else out
