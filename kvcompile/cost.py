"""Roofline cost model: KV bytes, decode-step and prefill latency, memory and max batch on a target.

All numbers come from the target file (``memory_bandwidth``, ``flops``, ``memory_bytes``) and from the
strategies' exact byte accounting; nothing is measured here.

Decode step (one new token for each of ``B`` sequences at context ``C``)::

    bytes_read = param_bytes + B * sum_heads reads_bytes_for(C)          # weights read once per step
    flops      = 2 * num_params * B + B * sum_heads (4 * G * D * C_att + dequant_flops_per_token * C)
    step_s     = max(bytes_read / bandwidth, flops / peak_flops(model dtype))

``C_att`` is the number of tokens a head attends over (``strategy.tokens_kept(C)`` when the strategy
provides it, else ``C``); ``G`` query heads share a KV head. Prefill of ``T`` tokens per sequence is
compute-bound: ``flops = 2 * num_params * B * T + B * sum_layers 2 * Hq * D * T^2`` (causal QK^T and PV),
``prefill_s = max(flops / peak, (param_bytes + B * kv_bytes(T)) / bandwidth)``.

A node of ``gpus`` identical devices is modelled as ideal tensor parallelism (capacity, bandwidth and
FLOP/s multiplied, communication ignored); ``kvcompile.passes.place`` models placement in detail.

Example
-------
>>> from kvcompile.targets import load_target                       # doctest: +SKIP
>>> pred = predicted(program, strategies, load_target("h100"), batch=8, context=4096)  # doctest: +SKIP
>>> pred["tokens_per_s"], pred["max_batch"]                                            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .ir import AttentionSite, Program, dtype_bytes
from .strategies import Full, Strategy
from .targets import Target


def head_bytes(strategy: Strategy, site: AttentionSite, tokens: int) -> int:
    """Exact bytes one KV head holds for one sequence after ``tokens`` tokens."""
    return strategy.bytes_for(tokens, site.head_dim, dtype_bytes(site.dtype))


def head_read_bytes(strategy: Strategy, site: AttentionSite, tokens: int) -> int:
    """Bytes one KV head reads per decode step (``reads_bytes_for`` when defined, else every byte held)."""
    fn = getattr(strategy, "reads_bytes_for", None)
    db = dtype_bytes(site.dtype)
    return fn(tokens, site.head_dim, db) if fn is not None else strategy.bytes_for(tokens, site.head_dim, db)


def attended_tokens(strategy: Strategy, tokens: int) -> int:
    """Tokens a head attends over at decode (``tokens_kept`` when the strategy defines it)."""
    fn = getattr(strategy, "tokens_kept", None)
    return min(tokens, int(fn(tokens))) if fn is not None else tokens


def head_decode_flops(strategy: Strategy, site: AttentionSite, tokens: int) -> float:
    """FLOPs of one decode step of one KV head for one sequence (attention + dequantization)."""
    deq = getattr(strategy, "dequant_flops_per_token", None)
    extra = deq(site.head_dim) * tokens if deq is not None else 0
    return 4.0 * site.gqa_group * site.head_dim * attended_tokens(strategy, tokens) + extra


@dataclass(frozen=True, slots=True)
class StepCost:
    """A roofline estimate: time is the max of memory time and compute time."""

    bytes_moved: float
    flops: float
    memory_s: float
    compute_s: float

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def _bandwidth(target: Target) -> float:
    return target.memory_bandwidth * target.gpus


def _peak(target: Target, dtype: str) -> float:
    return target.peak_flops(dtype) * target.gpus


def _rows(program: Program, strategies: Sequence[Sequence[Strategy]]):
    if len(strategies) != len(program.sites):
        raise ValueError(f"strategies: {len(strategies)} layers given, program has {len(program.sites)}")
    return zip(program.sites, strategies, strict=True)


def kv_bytes(program: Program, strategies: Sequence[Sequence[Strategy]], tokens: int) -> int:
    """Exact KV bytes of one sequence after ``tokens`` tokens under a per-layer, per-head assignment."""
    return sum(head_bytes(s, site, tokens) for site, row in _rows(program, strategies) for s in row)


def decode_step(
    program: Program, strategies: Sequence[Sequence[Strategy]], target: Target, batch: int, context: int
) -> StepCost:
    """Roofline time of one decode step for ``batch`` sequences at ``context`` tokens (module docstring)."""
    reads = sum(
        head_read_bytes(s, site, context) for site, row in _rows(program, strategies) for s in row
    )
    attn = sum(
        head_decode_flops(s, site, context) for site, row in _rows(program, strategies) for s in row
    )
    moved = program.model.param_bytes + batch * reads
    flops = 2.0 * program.model.num_params * batch + batch * attn
    return StepCost(moved, flops, moved / _bandwidth(target), flops / _peak(target, program.model.dtype))


def prefill(
    program: Program, strategies: Sequence[Sequence[Strategy]], target: Target, batch: int, tokens: int
) -> StepCost:
    """Roofline time of prefilling ``tokens`` tokens for each of ``batch`` sequences."""
    attn = sum(2.0 * s.num_q_heads * s.head_dim * tokens * tokens for s in program.sites)
    flops = batch * (2.0 * program.model.num_params * tokens + attn)
    moved = program.model.param_bytes + batch * kv_bytes(program, strategies, tokens)
    return StepCost(moved, flops, moved / _bandwidth(target), flops / _peak(target, program.model.dtype))


def max_batch(
    program: Program, strategies: Sequence[Sequence[Strategy]], target: Target, context: int
) -> int:
    """Largest batch whose weights + KV at ``context`` fit in the target's memory (0 if weights don't)."""
    free = target.memory_bytes * target.gpus - program.model.param_bytes
    per_seq = kv_bytes(program, strategies, context)
    if free <= 0:
        return 0
    return int(free // per_seq) if per_seq > 0 else 1 << 31


def uniform(program: Program, strategy: Strategy) -> list[list[Strategy]]:
    """The same strategy on every KV head."""
    return [[strategy] * s.num_kv_heads for s in program.sites]


def full_bf16_kv_bytes(program: Program, tokens: int) -> int:
    """Bytes of an uncompressed bfloat16 cache for one sequence (the reference for fractional budgets)."""
    return program.full_kv_bytes_per_token("bfloat16") * tokens


def predicted(
    program: Program, strategies: Sequence[Sequence[Strategy]], target: Target, *, batch: int, context: int
) -> dict[str, Any]:
    """The ``plan.predicted`` dict: memory, decode/prefill latency, max batch, tokens/s (plus a full-bf16
    baseline for comparison). Times in seconds, sizes in bytes."""
    kv = kv_bytes(program, strategies, context)
    full16 = full_bf16_kv_bytes(program, context)
    step = decode_step(program, strategies, target, batch, context)
    pre = prefill(program, strategies, target, batch, context)
    mem = program.model.param_bytes + batch * kv
    base_strats = uniform(program, Full(dtype="bfloat16"))
    base_step = decode_step(program, base_strats, target, batch, context)
    return {
        "target": target.spec,
        "batch": batch,
        "context": context,
        "kv_bytes_per_seq": kv,
        "kv_bytes_total": batch * kv,
        "kv_ratio_vs_full_bf16": kv / full16 if full16 else None,
        "weights_bytes": program.model.param_bytes,
        "memory_bytes": mem,
        "memory_capacity_bytes": target.memory_bytes * target.gpus,
        "fits": mem <= target.memory_bytes * target.gpus,
        "decode_step_s": step.seconds,
        "decode_memory_s": step.memory_s,
        "decode_compute_s": step.compute_s,
        "decode_bound": step.bound,
        "decode_bytes_read": step.bytes_moved,
        "prefill_s": pre.seconds,
        "prefill_bound": pre.bound,
        "max_batch": max_batch(program, strategies, target, context),
        "tokens_per_s": batch / step.seconds,
        "baseline_full_bf16": {
            "kv_bytes_per_seq": full16,
            "decode_step_s": base_step.seconds,
            "max_batch": max_batch(program, base_strats, target, context),
            "tokens_per_s": batch / base_step.seconds,
        },
    }
