"""The plan artifact: a versioned, hashed JSON file that serving code loads.

A plan records, per layer and per KV head, the strategy spec chosen by the compiler, plus what it
predicted (bytes, latency) and what verification measured. ``content_hash`` is the SHA-256 of the
canonical JSON of every other field, so any edit of the file is detected on load. Writes are
atomic (temp file + ``os.replace``). No pickle anywhere.

A plan is data from anyone (anyone can recompute a SHA-256), so :func:`load` trusts nothing in it:
bounded strict JSON, strict typed fields with bounded numbers, then :meth:`Plan.verify` re-derives
every derived field (layer/head counts, strategy checks, exact byte predictions, placement, the
schedule and kernel records). Kernel source is never taken from a plan to run (``codegen.cache``
renders kernels from their keys), and no value of a plan is used as a path. ``make_cache`` also
calls ``runtime.validate.check_model`` (fingerprint / dtype provenance). docs/bad_inputs.md lists the refusals.

Example
-------
>>> plan = load("out.kvplan")                                  # doctest: +SKIP
>>> cache = plan.make_cache(model)                             # doctest: +SKIP
>>> model.generate(ids, cache=cache, max_new_tokens=32)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from ._io import JsonInputError, check_json_shape, read_json_object, write_atomic
from .ir import dtype_bytes
from .strategies import Strategy, from_spec

SCHEMA_VERSION: Final = 1

# Hard limits on what a plan may hold. A plan comes from anywhere; every size the runtime or a report
# allocates or loops over is bounded here, far above any real model (Llama-3-405B: 126 layers, 8 KV
# heads, head_dim 128; a 70B plan with its schedule and kernels is ~130 KB).
MAX_PLAN_BYTES: Final = 64 << 20
MAX_JSON_DEPTH: Final = 24
MAX_JSON_NODES: Final = 4_000_000
MAX_LAYERS: Final = 1024
MAX_HEADS: Final = 4096  # query heads of a layer (KV heads <= query heads)
MAX_HEAD_DIM: Final = 4096
MAX_CONTEXT: Final = 1 << 24  # 16.7M tokens per sequence
MAX_BATCH: Final = 1 << 20
MAX_GPUS: Final = 64  # as targets.Target.gpus
MAX_NAME: Final = 512
MAX_NOTE: Final = 1 << 16
# planner objectives: "min-damage" (the head-strategy solve) and the placement solve's three
OBJECTIVES: Final = ("min-damage", "max-throughput", "min-latency", "min-memory")
FLOAT_DTYPES: Final = ("float64", "float32", "bfloat16", "float16")
# predicted[...] values that are exact functions of (sites, layers, config): recomputed on load
_EXACT_INT_KEYS = (
    "kv_bytes_at_context", "full_kv_bytes_at_context", "full_bf16_kv_bytes_at_context",
    "full_kv_bytes_per_token", "full_bf16_kv_bytes_per_token", "kv_bytes_per_seq", "kv_bytes_total",
    "kv_bytes", "full_kv_bytes",
)  # fmt: skip


class PlanError(ValueError):
    """A plan file is corrupt, truncated, tampered with, of another schema version, or unusable."""


class SettingsError(ValueError):
    """A compile / inspect setting (context, batch, budgets, tolerance, objective ...) is out of range."""


# ser_json_inf_nan="constants": a NaN that slipped in (model_copy does not validate) stays NaN in the
# dump, so compute_hash (allow_nan=False) refuses it instead of hashing it as null
_STRICT = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, ser_json_inf_nan="constants")
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]


def _json_value(v: Any) -> Any:
    """Free-form plan fields hold plain, finite, bounded JSON (also when built in memory)."""
    try:
        check_json_shape(v, max_depth=MAX_JSON_DEPTH, max_nodes=MAX_JSON_NODES)
    except JsonInputError as e:
        raise ValueError(str(e)) from None
    return v


def _one_of(allowed: tuple[str, ...]) -> AfterValidator:
    def check(v: str) -> str:
        if v not in allowed:
            raise ValueError(f"{v[:40]!r} is not one of {list(allowed)}")
        return v

    return AfterValidator(check)


FloatDtype = Annotated[str, _one_of(FLOAT_DTYPES)]
Objective = Annotated[str, _one_of(OBJECTIVES)]


class SiteRef(BaseModel):
    """What a plan needs to know of one attention site to be checked against a model."""

    model_config = _STRICT
    layer: int = Field(ge=0, lt=MAX_LAYERS)
    module_path: Name
    num_q_heads: int = Field(ge=1, le=MAX_HEADS)
    num_kv_heads: int = Field(ge=1, le=MAX_HEADS)
    head_dim: int = Field(ge=1, le=MAX_HEAD_DIM)
    v_head_dim: int = Field(ge=1, le=MAX_HEAD_DIM)
    sliding_window: int | None = Field(default=None, ge=1, le=1 << 31)


class ModelRef(BaseModel):
    model_config = _STRICT
    name: Name
    arch: Name
    model_type: Name
    fingerprint: Annotated[str, Field(max_length=128)]
    dtype: FloatDtype
    num_params: int = Field(ge=0, le=1 << 50)
    param_bytes: int = Field(ge=0, le=1 << 53)
    on_meta: bool
    sites: list[SiteRef] = Field(min_length=1, max_length=MAX_LAYERS)


class PlannerOptions(BaseModel):
    """Planner settings that change the plan (passes/README.md; read by passes via ``PassContext.opt``)."""

    model_config = _STRICT
    candidates: Literal["planner", "library"] | list[dict[str, Any]] | None = None
    damage: Literal["calibration", "priors"] = "calibration"
    kv_dtype: FloatDtype | None = None  # account the cache in this dtype (None: the model's)
    verify: bool = True
    verify_tokens: int = Field(default=1024, ge=128, le=MAX_CONTEXT)
    verify_samples: int | None = Field(default=None, ge=1, le=64)
    verify_iterations: int = Field(default=3, ge=0, le=16)
    solver_seed: int = Field(default=0, ge=0, le=1 << 31)
    solver_workers: int = Field(default=1, ge=1, le=256)
    solver_time_limit_s: float = Field(default=20.0, gt=0, le=3600)
    max_kernels_per_layer: int | None = Field(default=None, ge=1, le=64)
    budget: Literal["fit"] | None = None
    max_batch: int | None = Field(default=None, ge=1, le=MAX_BATCH)
    allow_host: bool | None = None
    host_memory_bytes: int | None = Field(default=None, gt=0, le=1 << 60)


class PlanConfig(BaseModel):
    """What the user asked for. Later issues add fields; unknown keys are rejected. Every number is
    bounded (a bad setting is a :class:`SettingsError` at compile time and a PlanError on load)."""

    model_config = _STRICT
    context: int = Field(default=4096, gt=0, le=MAX_CONTEXT)
    batch: int = Field(default=1, gt=0, le=MAX_BATCH)
    kv_budget: float | None = Field(default=None, gt=0, le=1, description="fraction of full bf16 KV bytes, or None")
    kv_budget_bytes: int | None = Field(default=None, gt=0, le=1 << 60)
    latency_budget_s: float | None = Field(default=None, gt=0, le=3600)
    tolerance: float | None = Field(default=None, ge=0, le=1e6)
    objective: Objective = "min-damage"
    calibration: Annotated[str, Field(min_length=1, max_length=MAX_NAME)] | None = None
    reference_dtype: FloatDtype = "bfloat16"
    planner: PlannerOptions = Field(default_factory=PlannerOptions)


class TargetRef(BaseModel):
    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    gpus: int = Field(default=1, ge=1, le=MAX_GPUS)
    memory_bytes: int = Field(gt=0, le=1 << 50)
    memory_bandwidth: float = Field(gt=0, le=1e16)


class LayerPlan(BaseModel):
    model_config = _STRICT
    layer: int = Field(ge=0, lt=MAX_LAYERS)
    # one strategy spec per KV head, in KV-head order (checked by strategies.from_spec)
    heads: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_HEADS)


Json = Annotated[Any, AfterValidator(_json_value)]


class Plan(BaseModel):
    model_config = _STRICT

    schema_version: Literal[1] = SCHEMA_VERSION
    kvcompile_version: Annotated[str, Field(max_length=64)] = __version__
    model: ModelRef
    target: TargetRef
    config: PlanConfig
    layers: list[LayerPlan] = Field(max_length=MAX_LAYERS)
    predicted: dict[str, Json] = Field(default_factory=dict)
    measured: dict[str, Json] | None = None
    placement: dict[str, Json] | None = None  # parallelism / memory placement (place_kv pass)
    schedule: list[dict[str, Json]] | None = None  # runtime schedule (codegen.lower), checked on load
    kernels: dict[str, dict[str, Json]] | None = None  # kernel records by uri, checked on load
    notes: list[Annotated[str, Field(max_length=MAX_NOTE)]] = Field(default_factory=list, max_length=4096)
    engine: dict[str, Json] | None = None  # serving engine the plan was compiled for (kvcompile.engines)
    content_hash: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""

    # ---- strategies and bytes --------------------------------------------------------------
    def strategies(self) -> list[list[Strategy]]:
        """``[layer][kv_head] -> Strategy``; raises PlanError on an unknown or invalid spec."""
        out = []
        for lp in self.layers:
            row = []
            for h, spec in enumerate(lp.heads):
                try:
                    row.append(from_spec(spec))
                except ValueError as e:
                    raise PlanError(f"layer {lp.layer} head {h}: {_clip(e)}") from None
            out.append(row)
        return out

    def predicted_kv_bytes(self, tokens: int | None = None, batch: int = 1, decoded: int = 0) -> int:
        """Exact KV bytes the plan's cache holds after a prefill of ``tokens`` tokens (default:
        config.context) followed by ``decoded`` single-token decode steps.

        The split matters for strategies that select only at prefill (SnapKV, compositions):
        their decode tokens are all kept, so bytes after prefill+decode differ from a prefill of
        the same total length.
        """
        n = self.config.context if tokens is None else tokens
        db = dtype_bytes(self.model.dtype)
        total = 0
        for site, row in zip(self.model.sites, self.strategies(), strict=True):
            total += sum(s.bytes_for_seq(n, decoded, site.head_dim, db) for s in row)
        return total * batch

    def full_kv_bytes(self, tokens: int | None = None, batch: int = 1, dtype: str | None = None) -> int:
        """Bytes of an uncompressed cache (``dtype`` default: the model dtype)."""
        n = self.config.context if tokens is None else tokens
        db = dtype_bytes(dtype or self.model.dtype)
        return sum(s.num_kv_heads * (s.head_dim + s.v_head_dim) * db for s in self.model.sites) * n * batch

    def make_cache(self, model: Any, **kw: Any) -> Any:
        """Alias of :func:`kvcompile.runtime.make_cache` (checks the plan fits the model first).

        A plan does not import the runtime: importing :mod:`kvcompile.runtime` registers the builder
        as ``Plan.make_cache.builder``."""
        builder = getattr(Plan.make_cache, "builder", None)
        if builder is None:
            raise PlanError("plan.make_cache needs the runtime: import kvcompile.runtime first")
        return builder(self, model, **kw)

    # ---- invariants ---------------------------------------------------------------------------
    def verify(self, *, derived: bool = True) -> list[list[Strategy]]:
        """Check every cross-field invariant; return the strategies ``[layer][kv_head]``.

        Always: layers and sites listed in order ``0..L-1`` and of equal count, head counts (one spec
        per KV head, query heads a multiple of KV heads), every spec through ``strategies.from_spec``
        (its ``check()``) and ``validate_for`` the site's head_dim and the plan's context. With
        ``derived`` (what :func:`load` does) also what is *derived* from those: the exact byte values
        of ``predicted`` and the placement's layers / heads / node. The schedule and kernel records are
        derived by codegen and checked there (``codegen.check.check_codegen``, run by :func:`kvcompile.load`;
        the runtime re-lowers and compares too). Raises PlanError.
        """
        sites = self.model.sites
        if len(self.layers) != len(sites):
            raise PlanError(f"plan has {len(self.layers)} layers but {len(sites)} model sites")
        for i, (site, lp) in enumerate(zip(sites, self.layers, strict=True)):
            if site.layer != i or lp.layer != i:
                raise PlanError(f"layer {i}: layers and sites must be listed in order 0..L-1 (found {lp.layer})")
            if site.num_kv_heads > site.num_q_heads or site.num_q_heads % site.num_kv_heads:
                raise PlanError(
                    f"layer {i}: {site.num_q_heads} query heads is not a multiple of {site.num_kv_heads} KV heads"
                )
            if len(lp.heads) != site.num_kv_heads:
                raise PlanError(f"layer {i}: {len(lp.heads)} strategies for {site.num_kv_heads} KV heads")
        strategies = self.strategies()
        for site, row in zip(sites, strategies, strict=True):
            for h, strat in enumerate(row):
                try:
                    strat.validate_for(head_dim=site.head_dim, context=self.config.context)
                except ValueError as e:
                    raise PlanError(f"layer {site.layer} head {h}: {_clip(strat.label())}: {_clip(e)}") from None
                except Exception as e:  # odd sizes must not crash a strategy's own check
                    raise PlanError(f"layer {site.layer} head {h}: {strat.label()}: {type(e).__name__}") from None
        if derived:
            self._verify_predicted()
            self._verify_placement()
        return strategies

    def _verify_predicted(self) -> None:
        """``predicted`` byte values are exact functions of the layers: recompute and compare."""
        pr, cfg = self.predicted, self.config
        if not pr:
            return
        if "context" in pr and pr["context"] != cfg.context or "batch" in pr and pr["batch"] != cfg.batch:
            raise PlanError("predicted: context/batch differ from the plan's config")
        if "target" in pr and pr["target"] not in self._target_names():
            raise PlanError(f"predicted.target {_short(pr['target'])} is not the plan's target {self.target.name}")
        t = self.target
        if "memory_capacity_bytes" in pr and pr["memory_capacity_bytes"] != t.memory_bytes * t.gpus:
            raise PlanError("predicted.memory_capacity_bytes is not the target's memory x GPUs")
        want: dict[str, float] = {}
        kv_ctx = self.predicted_kv_bytes(cfg.context, cfg.batch)
        per_seq = self.predicted_kv_bytes(cfg.context, 1)
        full_bf16 = self.full_kv_bytes(cfg.context, cfg.batch, dtype="bfloat16")
        want.update(
            kv_bytes_at_context=kv_ctx,
            full_kv_bytes_at_context=self.full_kv_bytes(cfg.context, cfg.batch),
            full_bf16_kv_bytes_at_context=full_bf16,
            full_kv_bytes_per_token=self.full_kv_bytes(1, 1),
            full_bf16_kv_bytes_per_token=self.full_kv_bytes(1, 1, dtype="bfloat16"),
            kv_bytes_per_seq=per_seq,
            kv_bytes_total=kv_ctx,
            kv_bytes=per_seq,
            full_kv_bytes=self.full_kv_bytes(cfg.context, 1),
            kv_bytes_per_token=kv_ctx / (cfg.context * cfg.batch),
            kv_ratio_vs_full_bf16=kv_ctx / full_bf16,
        )
        for key, value in want.items():
            if key not in pr:
                continue
            got = pr[key]
            exact = key in _EXACT_INT_KEYS
            ok = (
                type(got) is int and got == value
                if exact
                else isinstance(got, (int, float))
                and not isinstance(got, bool)
                and math.isclose(got, value, rel_tol=1e-9)
            )
            if not ok:
                raise PlanError(
                    f"predicted.{key} = {str(got)[:40]} but the layers give {value}: the plan was edited or is stale"
                )

    def _target_names(self) -> tuple[str, str]:
        t = self.target
        return t.name, f"{t.name}:{t.gpus}"

    def _verify_placement(self) -> None:
        """A placement (``place_kv``) must describe this plan: its node, context, layers and heads."""
        pl = self.placement
        if not pl or "tp" not in pl:
            return
        try:
            view = _PlacementView.model_validate(pl)
        except ValidationError as e:
            raise PlanError(f"placement: {_first_error(e)}") from None
        sites = self.model.sites
        if view.target not in self._target_names() or view.per_gpu.capacity != self.target.memory_bytes:
            raise PlanError(f"placement: made for target {view.target[:40]!r}, not the plan's {self.target.name}")
        if view.gpus != self.target.gpus or view.context != self.config.context:
            raise PlanError(f"placement: made for {view.gpus} GPUs at context {view.context}, the plan's "
                            f"target has {self.target.gpus} GPUs and context {self.config.context}")  # fmt: skip
        if view.tp * view.replicas > view.gpus or len(view.rank_heads) != view.tp:
            raise PlanError(f"placement: TP={view.tp} x {view.replicas} replicas on {view.gpus} GPUs "
                            f"with {len(view.rank_heads)} rank head lists")  # fmt: skip
        if len(view.placement) != len(sites):
            raise PlanError(f"placement: {len(view.placement)} layer rows for {len(sites)} layers")
        for i, (row, site) in enumerate(zip(view.placement, sites, strict=True)):
            heads = sorted(h for g in row.groups for h in g.heads)
            if row.layer != i or heads != list(range(site.num_kv_heads)):
                raise PlanError(f"placement: layer row {i} does not cover KV heads 0..{site.num_kv_heads - 1} once")
            for g in row.groups:
                try:
                    spec = json.loads(g.group)
                except ValueError:
                    spec = None
                if any(self.layers[i].heads[h] != spec for h in g.heads):
                    raise PlanError(f"placement: layer {i} group {g.group[:60]!r} is not the strategy of its heads")
        for r in view.rank_heads:
            if any(h >= max(s.num_kv_heads for s in sites) for h in r):
                raise PlanError("placement: rank_heads names a KV head the model does not have")

    # ---- hashing and files --------------------------------------------------------------------
    def compute_hash(self) -> str:
        # fields added after schema 1 (``engine``, ``config.planner``) are hashed only when they differ
        # from their default, so plans written before they existed keep their hash
        body = self.model_dump(mode="json", exclude={"content_hash"} | ({"engine"} if self.engine is None else set()))
        if self.config.planner == PlannerOptions():
            body["config"].pop("planner", None)
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)  # NaN has no JSON form
        return hashlib.sha256(text.encode()).hexdigest()

    def sealed(self) -> Plan:
        """A copy whose ``content_hash`` matches its content."""
        return self.model_copy(update={"content_hash": self.compute_hash()})

    def to_json(self) -> str:
        return json.dumps(self.sealed().model_dump(mode="json"), indent=1, sort_keys=True)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, self.to_json())
        return path


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class _PlacementGroup(_Lenient):
    group: Annotated[str, Field(max_length=1 << 12)]
    heads: list[Annotated[int, Field(ge=0, lt=MAX_HEADS)]] = Field(min_length=1, max_length=MAX_HEADS)
    where: Annotated[str, Field(max_length=64)]


class _PlacementRow(_Lenient):
    layer: int = Field(ge=0, lt=MAX_LAYERS)
    groups: list[_PlacementGroup] = Field(min_length=1, max_length=MAX_HEADS)


class _PerGpu(_Lenient):
    weights: int
    kv: int
    activations: int
    reserve: int
    free: int
    capacity: int


class _PlacementView(_Lenient):
    """The fields of ``Plan.placement`` that reports and checks read (the place_kv pass may add more)."""

    tp: int = Field(ge=1, le=MAX_GPUS)
    gpus: int = Field(ge=1, le=MAX_GPUS)
    replicas: int = Field(default=1, ge=1, le=MAX_GPUS)
    context: int = Field(ge=1, le=MAX_CONTEXT)
    batch: int = Field(ge=0, le=MAX_BATCH)
    objective: Annotated[str, Field(max_length=64)]
    target: Annotated[str, Field(max_length=128)]
    kv_copies: int = Field(ge=0, le=MAX_HEADS * MAX_GPUS)
    tokens_per_s: float = Field(ge=0)
    node_tokens_per_s: float = Field(default=0.0, ge=0)
    step_time_s: float = Field(ge=0)
    time_breakdown_s: dict[Annotated[str, Field(max_length=64)], float] = Field(default_factory=dict, max_length=64)
    per_gpu: _PerGpu
    host_kv_bytes: int = Field(ge=0)
    placement: list[_PlacementRow] = Field(max_length=MAX_LAYERS)
    rank_heads: list[list[Annotated[int, Field(ge=0, lt=MAX_HEADS)]]] = Field(max_length=MAX_GPUS)
    binding: Annotated[str, Field(max_length=MAX_NOTE)]


def _clip(e: Any, n: int = 300) -> str:
    """One line of at most ``n`` characters (values inside a plan can be megabytes long)."""
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _short(v: Any, n: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def _first_error(e: ValidationError) -> str:
    first = e.errors()[0]
    return _clip(f"{'.'.join(_clip(x, 60) for x in first['loc'])}: {first['msg']}")


def load(path: str | os.PathLike[str]) -> Plan:
    """Read a plan that may come from anyone; return it only if every check passes.

    Order: bounded strict JSON (:func:`kvcompile._io.read_json_strict`: UTF-8, no NaN/Infinity, no
    duplicate keys, depth / size limits), schema version, strict pydantic fields (exact types,
    bounded numbers, no unknown fields), content hash, then :meth:`Plan.verify` (cross-field
    invariants, predicted bytes, placement, schedule and kernels). Nothing in the file is executed,
    imported or used as a path. Raises :class:`PlanError` with a one-line reason.
    """
    path = Path(path)
    raw = read_json_object(path, PlanError, "expected a JSON object",
                           max_bytes=MAX_PLAN_BYTES, max_depth=MAX_JSON_DEPTH, max_nodes=MAX_JSON_NODES)  # fmt: skip
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION or type(version) is not int:
        raise PlanError(
            f"{path}: schema_version {_short(version)} is not supported (this kvcompile reads {SCHEMA_VERSION})"
        )
    try:
        plan = Plan.model_validate(raw, strict=True)
    except ValidationError as e:
        raise PlanError(f"{path}: invalid plan: {_first_error(e)}") from None
    if not plan.content_hash:
        raise PlanError(f"{path}: plan has no content_hash")
    if plan.compute_hash() != plan.content_hash:
        raise PlanError(f"{path}: content hash mismatch: the file was modified after it was written")
    try:
        plan.verify()
    except PlanError as e:
        raise PlanError(f"{path}: {_clip(e, 600)}") from None
    return plan
