"""The kvcompile IR: a small, frozen, typed description of a model's attention sites.

Every pass is a pure function ``Program -> Program`` (see ``kvcompile.passes``); passes change a
program with :func:`dataclasses.replace`, never in place. :func:`verify` checks the invariants
below and runs after every pass.

Invariants
----------
* ``sites`` are sorted by ``layer`` and layer indices are ``0..num_layers-1`` with no gaps.
* ``num_q_heads % num_kv_heads == 0`` (GQA grouping is exact).
* ``assignment``, when set, has one entry per layer and one strategy spec per KV head of that layer.
* Sizes are positive; ``sliding_window`` is ``None`` or positive.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

DTYPE_BYTES: Mapping[str, int] = MappingProxyType(
    {
        "float64": 8,
        "float32": 4,
        "bfloat16": 2,
        "float16": 2,
        "float8_e4m3fn": 1,
        "float8_e5m2": 1,
        "int8": 1,
        "uint8": 1,
    }
)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype named as in torch (``"bfloat16"``, ``"float32"`` ...)."""
    name = dtype.removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


class PosKind(str, enum.Enum):
    """How positions enter attention at a site."""

    ROPE = "rope"  # rotary embedding applied to q/k before the cache (keys cached post-RoPE)
    LEARNED = "learned"  # absolute learned embeddings added to the residual stream (GPT-2)
    ALIBI = "alibi"  # linear bias on the scores
    NONE = "none"


@dataclass(frozen=True, slots=True)
class AttentionSite:
    """One attention layer as seen in the captured graph.

    ``kv_shape_per_token`` is the per-token shape of each of K and V: ``(num_kv_heads, head_dim)``.
    """

    layer: int
    module_path: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    pos: PosKind
    rope_theta: float | None
    sliding_window: int | None
    dtype: str
    scale: float

    @property
    def gqa_group(self) -> int:
        """Query heads per KV head."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def kv_shape_per_token(self) -> tuple[int, int]:
        return (self.num_kv_heads, self.head_dim)

    def full_kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """Bytes per token of an uncompressed K+V cache for this layer (all KV heads)."""
        b = dtype_bytes(dtype or self.dtype)
        return self.num_kv_heads * (self.head_dim + self.v_head_dim) * b


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Model-level facts the cost model needs."""

    name: str
    arch: str  # model class name, e.g. "LlamaForCausalLM"
    model_type: str  # config.model_type, e.g. "llama"
    fingerprint: str  # stable hash of config (+ weights digest when real weights are present)
    num_params: int
    param_bytes: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    dtype: str
    on_meta: bool  # True when no real weights are present (planning only)
    max_position_embeddings: int | None = None


@dataclass(frozen=True, slots=True)
class Program:
    """The whole IR: model facts, attention sites, and what passes have decided so far.

    ``assignment[layer][kv_head]`` is a strategy spec dict (``{"name": ..., **params}``) as stored in
    plans; ``None`` until a pass assigns strategies. ``facts`` holds pass results that later passes
    read (e.g. calibration damage tables, solver status); values must be JSON-serialisable.
    """

    model: ModelInfo
    sites: tuple[AttentionSite, ...]
    assignment: tuple[tuple[Mapping[str, Any], ...], ...] | None = None
    facts: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def num_layers(self) -> int:
        return len(self.sites)

    def full_kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """Uncompressed K+V bytes per token for the whole model (2 * L * kv_heads * head_dim * bytes)."""
        return sum(s.full_kv_bytes_per_token(dtype) for s in self.sites)

    def with_facts(self, **kv: Any) -> Program:
        """A copy with extra ``facts`` entries (later keys win)."""
        merged = dict(self.facts)
        merged.update(kv)
        return Program(self.model, self.sites, self.assignment, MappingProxyType(merged))


class IRError(ValueError):
    """An IR invariant does not hold."""


def verify(program: Program) -> Program:
    """Check the invariants in the module docstring; return the program unchanged or raise IRError."""
    if not program.sites:
        raise IRError(f"{program.model.arch}: program has no attention sites")
    for i, s in enumerate(program.sites):
        where = f"layer {s.layer} ({s.module_path})"
        if s.layer != i:
            raise IRError(f"{where}: sites must be ordered by layer 0..L-1 without gaps, got index {i}")
        if min(s.num_q_heads, s.num_kv_heads, s.head_dim, s.v_head_dim) <= 0:
            raise IRError(f"{where}: head counts and head_dim must be positive")
        if s.num_q_heads % s.num_kv_heads:
            raise IRError(f"{where}: {s.num_q_heads} query heads not divisible by {s.num_kv_heads} KV heads")
        if s.sliding_window is not None and s.sliding_window <= 0:
            raise IRError(f"{where}: sliding_window must be positive or None")
        dtype_bytes(s.dtype)
    if program.model.num_layers != len(program.sites):
        raise IRError(
            f"model reports {program.model.num_layers} layers but {len(program.sites)} attention sites were found"
        )
    if program.assignment is not None:
        if len(program.assignment) != len(program.sites):
            raise IRError(f"assignment has {len(program.assignment)} layers, program has {len(program.sites)}")
        for s, heads in zip(program.sites, program.assignment, strict=True):
            if len(heads) != s.num_kv_heads:
                raise IRError(f"layer {s.layer}: assignment has {len(heads)} heads, site has {s.num_kv_heads}")
            for spec in heads:
                if "name" not in spec:
                    raise IRError(f"layer {s.layer}: strategy spec without a name: {dict(spec)}")
    return program
