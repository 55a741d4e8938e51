"""Device helpers shared by the decode kernels: query load, online softmax, split-K partials + reduce.

Conventions (every decode kernel follows them):

* one program serves one (batch row, KV head, split): the ``G`` query heads of that KV head are the
  rows of a ``[BLOCK_G, BLOCK_D]`` tile (GQA-aware: K/V bytes are read once for all ``G`` heads);
* scores live in the log2 domain: ``q`` is pre-multiplied by ``scale * log2(e)`` so ``exp2`` replaces
  ``exp``; masked keys carry ``-inf``;
* a program writes a partial ``(m, lsum, acc)`` (running max, running sum, unnormalised output) for its
  split; :func:`_reduce_splits_kernel` merges the splits (flash-decoding, Dao et al. 2023):
  ``out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s`` with ``M = max_s m_s``; a row whose keys
  are all masked gets zeros (as :func:`kvcompile.strategies.reference_attention`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .formats import FORMATS

LOG2E = 1.4426950408889634

# main-region storage formats (constexpr ids shared by the dense, quant and mixed kernels)
FMT_FULL, FMT_FP8, FMT_COMPACT, FMT_QUANT, FMT_QUANT_POS, FMT_MIKV = (FORMATS[n].fid for n in FORMATS)
FORMAT_IDS = {name: f.fid for name, f in FORMATS.items()}  # the kernels branch on these constants


@triton.jit
def _e4m3_to_f32(bits):
    """float8 e4m3fn bit patterns (uint8) to float32: ``(-1)^s 2^(e-7) (1 + m/8)``, subnormal ``2^-6 m/8``.

    Uses the hardware conversion (``cvt`` on sm_89+, emulated by Triton before). The NaN patterns
    0x7F/0xFF are never stored (the fp8 store saturates to +-448); the CPU interpreter decodes them as
    +-480, every other pattern exactly."""
    return bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _load_q(
    q_ptr,
    b,
    hq0,
    Hq,
    qk_scale,
    D: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows ``hq0 .. hq0+G-1`` of ``q`` [B, Hq, D] times ``qk_scale`` as a [BLOCK_G, BLOCK_D] tile: float32
    for float32 models, float16 for half-precision ones (the dtype every tile of the program then uses
    for its tensor-core products, see :func:`_dot`)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = q_ptr + (b * Hq + hq0 + offs_g[:, None]) * D + offs_d[None, :]
    mask = (offs_g[:, None] < G) & (offs_d[None, :] < D)
    q = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * qk_scale
    if q_ptr.dtype.element_ty != tl.float32:
        q = q.to(tl.float16)
    return q


@triton.jit
def _program_ids(H):
    """Decode program ``(b * H + h, split)`` -> ``(pid, b, h, split)``; ``pid`` is the storage row."""
    pid = tl.program_id(0)
    return pid, pid // H, pid % H, tl.program_id(1)


@triton.jit
def _decode_init(
    q_ptr,
    lead_ptr,
    b,
    hq0,
    Hq,
    qk_scale,
    D: tl.constexpr,
    G: tl.constexpr,
    HAS_LEAD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Start of a decode program: ``(q, lead, m, lsum, acc)`` with ``q`` from :func:`_load_q`, ``lead`` =
    ``lead[b]`` (0 without ``HAS_LEAD``) and the empty online-softmax state ``m = -inf``, ``lsum = 0``,
    ``acc = 0``."""
    q = _load_q(q_ptr, b, hq0, Hq, qk_scale, D, G, BLOCK_G, BLOCK_D)
    if HAS_LEAD:  # noqa: SIM108 - constexpr branch: one side is compiled
        lead = tl.load(lead_ptr + b)
    else:
        lead = 0
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    return q, lead, m, lsum, acc


@triton.jit
def _split_range(n, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[lo, hi)`` of ``split`` over ``n`` keys: ``lo = split * C``, ``hi = min(lo + C, n)`` with
    ``C = ceil(ceil(n / NUM_SPLITS) / BLOCK_N) * BLOCK_N``."""
    chunk = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    return lo, tl.minimum(lo + chunk, n)


@triton.jit
def _dot(a, b):
    """``a @ b`` with float32 accumulation: exact fp32 products when ``a`` is float32, otherwise tensor-core
    products in ``a``'s dtype (``b`` is cast to it)."""
    if a.dtype == tl.float32:  # noqa: SIM108 - a compile-time branch in a Triton JIT function
        res = tl.dot(a, b.to(tl.float32), input_precision="ieee")
    else:
        res = tl.dot(a, b.to(a.dtype))
    return res


@triton.jit
def _online_update(m, lsum, acc, s, v):
    """One online-softmax step: ``s`` [BG, BN] log2-domain scores (-inf = masked), ``v`` [BN, BD] in the
    tile dtype (float32, or float16 for half-precision models)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep p = alpha = 0
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    lsum = lsum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
    return m_new, lsum, acc


@triton.jit
def _store_partial(m_ptr, l_ptr, acc_ptr, row, m, lsum, acc, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write one split's (m, lsum, acc) at ``row`` = (b * H + h) * NUM_SPLITS + split (padded tiles)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(m_ptr + row * BLOCK_G + offs_g, m)
    tl.store(l_ptr + row * BLOCK_G + offs_g, lsum)
    tl.store(acc_ptr + (row * BLOCK_G + offs_g[:, None]) * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _finish(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    b,
    h,
    H,
    split,
    m,
    lsum,
    acc,
    D: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """End of a decode program: with one split write ``acc / l`` straight to ``out`` [B, H*G, D] (no reduce
    launch; zeros where every key is masked), else the split partial for :func:`_reduce_splits_kernel`."""
    if NUM_SPLITS == 1:
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        res = tl.where(lsum[:, None] > 0, acc / tl.where(lsum > 0, lsum, 1.0)[:, None], 0.0)
        mask = (offs_g[:, None] < G) & (offs_d[None, :] < D)
        ptrs = out_ptr + (b * H * G + h * G + offs_g[:, None]) * D + offs_d[None, :]
        tl.store(ptrs, res.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        _store_partial(
            m_ptr, l_ptr, acc_ptr, (b * H + h) * NUM_SPLITS + split, m, lsum, acc, BLOCK_G, BLOCK_D
        )


@triton.jit
def _reduce_splits_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    H,
    D: tl.constexpr,
    G: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, h*G + g, :] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s (0 if lsum = 0).

    Grid: (B * H,). ``out`` is [B, H * G, D] in the output dtype.
    """
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    big_m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        big_m = tl.maximum(big_m, tl.load(m_ptr + (pid * NUM_SPLITS + s) * BLOCK_G + offs_g))
    m_safe = tl.where(big_m == float("-inf"), 0.0, big_m)
    l_tot = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        row = pid * NUM_SPLITS + s
        w = tl.exp2(tl.load(m_ptr + row * BLOCK_G + offs_g) - m_safe)
        l_tot += w * tl.load(l_ptr + row * BLOCK_G + offs_g)
        acc += w[:, None] * tl.load(acc_ptr + (row * BLOCK_G + offs_g[:, None]) * BLOCK_D + offs_d[None, :])
    out = tl.where(l_tot[:, None] > 0, acc / tl.where(l_tot > 0, l_tot, 1.0)[:, None], 0.0)
    mask = (offs_g[:, None] < G) & (offs_d[None, :] < D)
    ptrs = out_ptr + (b * H * G + h * G + offs_g[:, None]) * D + offs_d[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


# jit helpers in dependency order, for rendering kernel sources (see kvcompile.codegen.cache)
COMMON_SOURCES = (
    _e4m3_to_f32,
    _load_q,
    _program_ids,
    _decode_init,
    _split_range,
    _dot,
    _online_update,
    _store_partial,
    _finish,
    _reduce_splits_kernel,
)
