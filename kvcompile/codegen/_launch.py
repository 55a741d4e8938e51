"""Host-side helpers shared by the kernel launchers: settings heuristic, checks, split-K reduce."""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton

from ._common import _reduce_splits_kernel

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeSettings:
    """Launch settings of a decode kernel: tile sizes, number of sequence splits, warps."""

    block_g: int
    block_n: int
    block_d: int
    num_splits: int
    num_warps: int

    def launch_meta(self) -> dict[str, int]:
        """The split-K decode kernels' tile constexprs and ``num_warps``, as launch keyword arguments."""
        return dict(
            BLOCK_G=self.block_g,
            BLOCK_N=self.block_n,
            BLOCK_D=self.block_d,
            NUM_SPLITS=self.num_splits,
            num_warps=self.num_warps,
        )


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_settings(
    tokens: int, head_dim: int, gqa: int, programs: int, device: torch.device, num_splits: int | None = None
) -> DecodeSettings:
    """Heuristic (no autotuning): tiles of 16+ rows/cols for ``tl.dot``; on GPU split the sequence until
    about two programs per SM are in flight (flash-decoding), keeping at least 4 blocks per split.
    Under the CPU interpreter tiles are small and the sequence is split only beyond 512 tokens."""
    block_g = max(16, triton.next_power_of_2(gqa))
    block_d = max(16, triton.next_power_of_2(head_dim))
    on_gpu = device.type == "cuda"
    block_n = (64 if head_dim <= 128 else 32) if on_gpu else 32
    if num_splits is None:
        if on_gpu:
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            want = triton.cdiv(2 * sms, max(programs, 1))
            num_splits = max(1, min(want, tokens // (4 * block_n), 64))
        else:
            num_splits = max(1, min(4, tokens // 512))
        # a power of two: NUM_SPLITS is a constexpr, so a growing context recompiles at most log2 times
        num_splits = 1 << (num_splits.bit_length() - 1)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")
    return DecodeSettings(block_g, block_n, block_d, num_splits, 4 if block_d <= 64 else 8)


def check_tensor(
    name: str, t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], device: torch.device
) -> None:
    """Raise ``ValueError`` naming the tensor when its shape, dtype, device or layout is wrong."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} not in {list(dtypes)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def split_q(q: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Accept q [B, Hq, 1, D] (decode) or [B, Hq, D]; return a contiguous [B, Hq, D] and whether q was 4-d."""
    if q.dim() == 4:
        if q.shape[2] != 1:
            raise ValueError(f"q: decode kernels take one query token, got q.shape[2]={q.shape[2]}")
        return q[:, :, 0].contiguous(), True
    if q.dim() != 3:
        raise ValueError(f"q: expected [B, Hq, 1, D] or [B, Hq, D], got shape {tuple(q.shape)}")
    return q.contiguous(), False


def alloc_partials(batch: int, heads: int, s: DecodeSettings, device: torch.device):
    """Buffers for the split partials (m, lsum, acc), padded to the tile sizes."""
    rows = batch * heads * s.num_splits if s.num_splits > 1 else 1  # one split: the kernel writes out
    m = torch.empty(rows, s.block_g, dtype=torch.float32, device=device)
    lsum = torch.empty(rows, s.block_g, dtype=torch.float32, device=device)
    acc = torch.empty(rows, s.block_g, s.block_d, dtype=torch.float32, device=device)
    return m, lsum, acc


def reduce_splits(
    partials, out: torch.Tensor, heads: int, head_dim: int, gqa: int, s: DecodeSettings, kernel=None
) -> torch.Tensor:
    """Launch the split-K merge into ``out`` [B, heads * gqa, head_dim] (nothing to do with one split:
    the decode kernel wrote ``out`` itself)."""
    if s.num_splits == 1:
        return out
    m, lsum, acc = partials
    kernel = kernel or _reduce_splits_kernel
    kernel[(out.shape[0] * heads,)](
        m,
        lsum,
        acc,
        out,
        heads,
        D=head_dim,
        G=gqa,
        NUM_SPLITS=s.num_splits,
        BLOCK_G=s.block_g,
        BLOCK_D=s.block_d,
        num_warps=s.num_warps,
    )
    return out


def decode_buffers(q3: torch.Tensor, tokens: int, head_dim: int, gqa: int, batch: int, kv_heads: int,
                   device: torch.device, num_splits: int | None = None):
    """Settings for a decode launch over ``tokens`` keys, its output [B, Hq, D] and split partials.

    Every decode launcher (dense, scored, quant, mixed) starts with these three steps in this order.
    """
    s = decode_settings(tokens, head_dim, gqa, batch * kv_heads, device, num_splits)
    out = torch.empty(batch, q3.shape[1], head_dim, dtype=q3.dtype, device=device)
    return s, out, alloc_partials(batch, kv_heads, s, device)


def lead_arg(lead: torch.Tensor | None, batch: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The ``lead`` [B] int64 tensor (leading padding per row) or a dummy, and whether it is present."""
    if lead is None:
        return torch.zeros(1, dtype=torch.int64, device=device), False
    check_tensor("lead", lead, (batch,), (torch.int64,), device)
    return lead, True


def tail_args(k_new, v_new, batch: int, heads: int, head_dim: int, device: torch.device):
    """The fp tail region (residual and/or new tokens) [B, Hg, T, D] or an empty one."""
    if k_new is None:
        e = torch.zeros(1, dtype=torch.float32, device=device)
        return e, e, 0
    t = k_new.shape[2] if k_new.dim() == 4 else -1
    k_new, v_new = k_new.contiguous(), v_new.contiguous()
    check_tensor("k_new", k_new, (batch, heads, t, head_dim), FLOAT_DTYPES, device)
    check_tensor("v_new", v_new, (batch, heads, t, head_dim), FLOAT_DTYPES, device)
    return k_new, v_new, t
