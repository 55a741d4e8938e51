"""Sink + window layers (StreamingLLM) inside vLLM 0.32 without forking it: a KV spec, its block manager
and a CPU_ATTN implementation, all registered through vLLM's public extension points.

* :class:`SinkWindowSpec` (a ``SlidingWindowSpec`` with ``sinks``): vLLM groups and sizes it as a sliding
  window layer, plus ``ceil(sinks / block)`` blocks per request (``max_admission_blocks_per_request``, which
  vLLM uses for both the pool size it reports and admission).
* :class:`SinkWindowManager` (registered for the spec with ``KVCacheSpecRegistry.register``): frees
  out-of-window blocks as ``SlidingWindowManager`` does, except the blocks covering positions ``< sinks``,
  which stay in the request's block table until it finishes.
* :class:`SinkWindowImpl` (a ``CPUAttentionBackendImpl``; the layer's cache writes are CPU_ATTN's own):
  query ``i`` attends keys ``j <= i`` with ``j < sinks or i - W < j``, read from the paged cache through
  the block table (fp8 codes times the layer's scale), in float32 SDPA per request. Only the sink and
  window positions are gathered, so the cost is that of the window, not of the sequence.

Prefix caching is disabled for plans with sink layers (``engines.vllm.engine_kwargs``): vLLM's sliding
window cache-hit search assumes the blocks before the window are gone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry


@dataclasses.dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    sinks: int = 0

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window + math.ceil(self.sinks / self.block_size), math.ceil(max_model_len / self.block_size) + 1)

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, Any]) -> bool:
        return all(isinstance(s, SinkWindowSpec) and (s.sliding_window, s.sinks) == (self.sliding_window, self.sinks)
                   for s in kv_cache_specs.values())


class SinkWindowManager(SlidingWindowManager):
    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = math.ceil(kv_cache_spec.sinks / self.block_size)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        skipped = self.get_num_skipped_tokens(processed_computed_tokens)
        if skipped <= 0 or request_id not in self.req_to_blocks:
            return
        last = min(skipped // self.block_size, len(self.req_to_blocks[request_id]))
        self._remove_blocks_in_range(request_id, self.sink_blocks, last)


def register() -> None:
    """Register the spec with its manager (after vLLM's built-ins, which registration must not pre-empt)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)


def sink_window_spec(spec: SlidingWindowSpec, sinks: int) -> SinkWindowSpec:
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
    return SinkWindowSpec(**fields, sinks=sinks)


@functools.lru_cache(maxsize=16)
def block_layout(isa: str, kv_cache_dtype: str, block: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where CPU_ATTN's writer puts token ``t``, channel ``d`` of one block of one KV head, for keys and values.

    The layout is ISA-specific (tiled for its kernels), so it is read off the writer itself: blocks of
    distinct codes are written with ``cpu_attn_reshape_and_cache`` (in base-64 digits for fp8, whose 256
    codes cannot name 8,192 slots at once) and ``inv[t * D + d]`` is the flat offset holding that element.
    """
    from vllm import _custom_ops as ops

    n = block * head_dim
    fp8 = kv_cache_dtype != "auto"
    kv = torch.zeros(1, 1, block, 2 * head_dim, dtype=torch.uint8 if fp8 else torch.bfloat16)
    kc, vc = kv.view(1, 1, 2 * block, head_dim).chunk(2, dim=2)
    slots = torch.arange(block)

    def write(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv.zero_()
        x = codes.view(block, 1, head_dim)
        ops.cpu_attn_reshape_and_cache(x, x, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype=kv_cache_dtype)
        return kc.reshape(n).clone(), vc.reshape(n).clone()

    idx = torch.arange(n)
    if not fp8:  # distinct finite bf16 bit patterns, copied as they are
        k, v = write((idx.to(torch.int16) + 0x3000).view(torch.bfloat16))
        src_k, src_v = k.view(torch.int16).long() - 0x3000, v.view(torch.int16).long() - 0x3000
    else:  # 64 exactly representable e4m3 values (codes 0x08..0x47) as digits
        digits = torch.arange(0x08, 0x48, dtype=torch.uint8).view(torch.float8_e4m3fn).float().to(torch.bfloat16)
        src_k, src_v, place = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), 1
        while place < n:
            k, v = write(digits[(idx // place) % 64])
            src_k += (k.long() - 0x08) * place
            src_v += (v.long() - 0x08) * place
            place *= 64
    out = []
    for src in (src_k, src_v):
        if sorted(src.tolist()) != list(range(n)):
            raise RuntimeError(f"CPU_ATTN block layout ({isa}, {kv_cache_dtype}) is not a permutation")
        inv = torch.empty(n, dtype=torch.long)
        inv[src] = torch.arange(n)
        out.append(inv)
    return out[0], out[1]


class SinkWindowImpl(CPUAttentionBackendImpl):
    """CPU_ATTN with sink tokens: set ``sink_tokens`` on an instance whose class is switched to this one."""

    sink_tokens: int = 0

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:
            return output
        num_blocks, hkv, bs, _ = kv_cache.shape
        kv = kv_cache.view(num_blocks, hkv, bs * 2, -1)
        D = kv.shape[-1]
        key_cache, value_cache = kv[:, :, :bs].reshape(num_blocks, hkv, bs * D), kv[:, :, bs:].reshape(
            num_blocks, hkv, bs * D)
        inv_k, inv_v = block_layout(layer.isa, self.kv_cache_dtype, bs, D)
        fp8 = self.is_fp8_kv_cache
        W, S = self.sliding_window, self.sink_tokens
        qsl = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        table = attn_metadata.block_table
        for r, L in enumerate(seq_lens):
            qs, qe = qsl[r], qsl[r + 1]
            if qe <= qs:
                continue
            first_q = L - (qe - qs)
            lo = max(0, first_q - W + 1)
            pos = torch.cat([torch.arange(min(S, lo)), torch.arange(lo, L)])
            blocks = pos // bs
            used = torch.unique(blocks)
            ids = table[r, used].long()
            k = key_cache[ids][..., inv_k].view(len(used), hkv, bs, D)  # [nb, Hkv, bs, D]
            v = value_cache[ids][..., inv_v].view(len(used), hkv, bs, D)
            row = torch.searchsorted(used, blocks)
            k, v = k[row, :, pos % bs], v[row, :, pos % bs]  # [N, Hkv, D]
            if fp8:
                k = k.view(torch.float8_e4m3fn).float() * layer._k_scale_float
                v = v.view(torch.float8_e4m3fn).float() * layer._v_scale_float
            else:
                k, v = k.float(), v.float()
            qpos = torch.arange(first_q, L)
            mask = (pos[None] <= qpos[:, None]) & ((pos[None] > qpos[:, None] - W) | (pos[None] < S))
            q = query[qs:qe].float().transpose(0, 1)  # [H, nq, D]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=self.scale,
                enable_gqa=q.shape[0] != k.shape[1])
            output[qs:qe] = out.transpose(0, 1).reshape(output[qs:qe].shape).to(output.dtype)
        return output
