"""The plan artifact: a versioned, hashed JSON file that serving code loads.

A plan records, per layer and per KV head, the strategy spec chosen by the compiler, plus what it
predicted (bytes, latency) and what verification measured. ``content_hash`` is the SHA-256 of the
canonical JSON of every other field, so any edit of the file is detected on load. Writes are
atomic (temp file + ``os.replace``). No pickle anywhere.

Example
-------
>>> plan = load("out.kvplan")                                  # doctest: +SKIP
>>> cache = plan.make_cache(model)                             # doctest: +SKIP
>>> model.generate(ids, past_key_values=cache, max_new_tokens=32)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from ._io import write_atomic
from .strategies import Strategy, from_spec

SCHEMA_VERSION: Final = 1


class PlanError(ValueError):
    """A plan file is corrupt, truncated, tampered with, of another schema version, or unusable."""


class SiteRef(BaseModel):
    """What a plan needs to know of one attention site to be checked against a model."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    layer: int
    module_path: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    sliding_window: int | None = None


class ModelRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    arch: str
    model_type: str
    fingerprint: str
    dtype: str
    num_params: int
    param_bytes: int
    on_meta: bool
    sites: list[SiteRef]


class PlanConfig(BaseModel):
    """What the user asked for. Later issues add fields; unknown keys are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    context: int = Field(4096, gt=0)
    batch: int = Field(1, gt=0)
    kv_budget: float | None = Field(default=None, description="fraction of full bf16 KV bytes, or None")
    kv_budget_bytes: int | None = None
    latency_budget_s: float | None = None
    tolerance: float | None = None
    objective: str = "min-damage"
    calibration: str | None = None
    reference_dtype: str = "bfloat16"


class TargetRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    gpus: int = 1
    memory_bytes: int
    memory_bandwidth: float


class LayerPlan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    layer: int
    heads: list[dict[str, Any]]  # one strategy spec per KV head, in KV-head order


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    kvcompile_version: str = __version__
    model: ModelRef
    target: TargetRef
    config: PlanConfig
    layers: list[LayerPlan]
    predicted: dict[str, Any] = Field(default_factory=dict)
    measured: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None  # parallelism / memory placement (later issue)
    schedule: list[dict[str, Any]] | None = None  # runtime schedule (codegen issue)
    kernels: dict[str, Any] | None = None  # kernel sources by uri, with their hashes (codegen issue)
    notes: list[str] = Field(default_factory=list)
    content_hash: str = ""

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
                    raise PlanError(f"layer {lp.layer} head {h}: {e}") from None
            out.append(row)
        return out

    def predicted_kv_bytes(self, tokens: int | None = None, batch: int = 1, decoded: int = 0) -> int:
        """Exact KV bytes the plan's cache holds after a prefill of ``tokens`` tokens (default:
        config.context) followed by ``decoded`` single-token decode steps.

        The split matters for strategies that select only at prefill (SnapKV, compositions):
        their decode tokens are all kept, so bytes after prefill+decode differ from a prefill of
        the same total length.
        """
        from .ir import dtype_bytes

        n = self.config.context if tokens is None else tokens
        db = dtype_bytes(self.model.dtype)
        total = 0
        for site, row in zip(self.model.sites, self.strategies(), strict=True):
            total += sum(s.bytes_for_seq(n, decoded, site.head_dim, db) for s in row)
        return total * batch

    def full_kv_bytes(self, tokens: int | None = None, batch: int = 1, dtype: str | None = None) -> int:
        """Bytes of an uncompressed cache (``dtype`` default: the model dtype)."""
        from .ir import dtype_bytes

        n = self.config.context if tokens is None else tokens
        db = dtype_bytes(dtype or self.model.dtype)
        return sum(s.num_kv_heads * (s.head_dim + s.v_head_dim) * db for s in self.model.sites) * n * batch

    def make_cache(self, model: Any, **kw: Any) -> Any:
        """Build the runtime cache for ``model`` (checks the plan fits the model first)."""
        from .runtime import make_cache

        return make_cache(self, model, **kw)

    # ---- hashing and files --------------------------------------------------------------------
    def compute_hash(self) -> str:
        body = self.model_dump(mode="json", exclude={"content_hash"})
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

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


def load(path: str | os.PathLike[str]) -> Plan:
    """Read a plan, verifying JSON, schema version, fields, strategies and content hash.

    Raises :class:`PlanError` with a one-line reason.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanError(f"{path}: cannot read ({e.strerror})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(
            f"{path}: not valid JSON, the file is corrupt or truncated ({e.msg} at char {e.pos})"
        ) from None
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: expected a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PlanError(
            f"{path}: schema_version {version!r} is not supported (this kvcompile reads {SCHEMA_VERSION})"
        )
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise PlanError(f"{path}: invalid plan: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not plan.content_hash:
        raise PlanError(f"{path}: plan has no content_hash")
    if plan.compute_hash() != plan.content_hash:
        raise PlanError(f"{path}: content hash mismatch: the file was modified after it was written")
    plan.strategies()  # unknown strategy names / bad parameters
    return plan
