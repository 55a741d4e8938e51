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
* ``facts`` keys are the ones in ``FACT_TYPES`` and each value has its declared type: the planner's own
  results are typed frozen records (:class:`Candidates`, :class:`Damage`, :class:`SolveResult`) whose
  shapes agree with the sites and with each other; the rest (what becomes plan fields) are mappings.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
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
    read: keys and types are declared in ``FACT_TYPES`` (checked by :func:`verify`); values serialise to JSON.
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


# ---- typed facts ----------------------------------------------------------------------------------
class FactRecord:
    """Base of typed, frozen fact records. Read-only mapping access (``rec["specs"]``, ``rec.get``,
    ``items``) mirrors the fields, so a record serialises like the JSON object it stands for."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))  # type: ignore[arg-type]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


@dataclass(frozen=True)
class Candidates(FactRecord):
    """``assign_candidates``: candidate specs defined at ``context``; ``per_layer[l]``: valid indices."""

    context: int
    specs: Sequence[Mapping[str, Any]]
    per_layer: Sequence[Sequence[int]]


@dataclass(frozen=True)
class Damage(FactRecord):
    """``calibrate``: ``values[l][h][c]`` per candidate; ``source`` is ``calibration`` or ``priors``."""

    source: str
    values: Sequence[Sequence[Sequence[float]]]
    layer_weight: Sequence[float]
    key: str | None = None
    cache_hit: bool | None = None
    seconds: float | None = None
    calibration: str | None = None
    tokens: int | None = None
    samples: int | None = None


@dataclass(frozen=True)
class SolveResult(FactRecord):
    """``solve_assignment``: solver status and the bytes of the chosen assignment."""

    status: str
    objective: float
    bound: float | None
    gap: float | None
    wall_s: float
    num_vars: int
    budget_bytes: int | None
    budget: str
    total_bytes: int
    budget_used: float | None
    kv_ratio_vs_full_bf16: float
    damage_source: str


# every fact a pass may put in a program, with its type (records are checked further in verify)
FACT_TYPES: Mapping[str, type | tuple[type, ...]] = MappingProxyType({
    "candidates": Candidates,
    "damage": Damage,
    "solve": SolveResult,
    "damage_scale": (list, tuple),
    "predicted": Mapping,
    "measured": Mapping,
    "placement": Mapping,
    "schedule": (list, tuple, Mapping),
    "kernels": Mapping,
    "notes": (list, tuple),
    "pass_timings": Mapping,
})


def _verify_facts(program: Program) -> None:
    facts = program.facts
    for key, value in facts.items():
        want = FACT_TYPES.get(key)
        if want is None:
            raise IRError(f"unknown fact {key!r}; declared facts: {sorted(FACT_TYPES)} (ir.FACT_TYPES)")
        if not isinstance(value, want):
            raise IRError(f"fact {key!r} must be {getattr(want, '__name__', want)}, got {type(value).__name__}")
    if not all(isinstance(n, str) for n in facts.get("notes", ())):
        raise IRError("fact 'notes' must be a list of strings")
    L = len(program.sites)
    cands = facts.get("candidates")
    bad = cands is not None and (
        len(cands.per_layer) != L or any(not 0 <= i < len(cands.specs) for r in cands.per_layer for i in r))
    if bad:
        raise IRError(f"candidates: per_layer must list valid spec indices for each of {L} layers")
    dmg = facts.get("damage")
    if dmg is not None:
        if dmg.source not in ("calibration", "priors"):
            raise IRError(f"damage source {dmg.source!r} must be 'calibration' or 'priors'")
        heads = [len(layer) for layer in dmg.values]
        if heads != [s.num_kv_heads for s in program.sites]:
            raise IRError(f"damage values must be [layer][kv head][candidate] for {L} layers, got heads {heads}")
        if cands is not None and any(len(row) != len(cands.specs) for layer in dmg.values for row in layer):
            raise IRError(f"damage rows must have one value per candidate ({len(cands.specs)})")


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
    _verify_facts(program)
    return program
