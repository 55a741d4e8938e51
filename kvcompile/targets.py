"""Hardware targets: datasheet numbers in ``targets/*.yaml``, loaded into a frozen pydantic model.

A spec is ``NAME`` or ``NAME:N`` (a node of N identical GPUs), e.g. ``h100-sxm:8``. Aliases such as
``h100`` map to a canonical file. Units are SI base units: bytes, bytes/s, FLOP/s, seconds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._io import JsonInputError, check_json_shape

TARGET_DIR = Path(__file__).resolve().parent.parent / "targets"
_PKG_TARGET_DIR = Path(__file__).resolve().parent / "data" / "targets"

ALIASES = {
    "h100": "h100-sxm",
    "h200": "h200",
    "a100": "a100-80gb",
    "mi300": "mi300x",
    "4090": "rtx-4090",
}

KV_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "int8", "int4", "int2")


class TargetError(ValueError):
    """A target spec or target file is invalid."""


class Target(BaseModel):
    """One accelerator (``gpus`` copies of it in a node). Numbers from the vendor datasheet."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str
    source: str = Field(min_length=8, description="datasheet / document the numbers come from")
    kind: Literal["gpu", "cpu"]
    vendor: str
    memory_bytes: int = Field(gt=0, le=1 << 50)
    memory_bandwidth: float = Field(gt=0, le=1e16, description="bytes/s")
    flops: dict[str, float] = Field(description="peak dense FLOP/s (or OP/s) per dtype: fp32, bf16, fp8, int8")
    sm_count: int = Field(gt=0, description="SMs (NVIDIA) / CUs (AMD) / cores (CPU)")
    smem_per_sm_bytes: int = Field(ge=0)
    l2_bytes: int = Field(ge=0)
    host_link: str
    host_link_bandwidth: float = Field(gt=0, description="bytes/s, one direction")
    interconnect: str
    interconnect_bandwidth: float = Field(ge=0, description="bytes/s per GPU, one direction")
    interconnect_latency_s: float = Field(ge=0)
    kv_dtypes: list[str]
    gpus: int = Field(default=1, ge=1, le=64)

    @field_validator("flops")
    @classmethod
    def _flops_keys(cls, v: dict[str, float]) -> dict[str, float]:
        missing = {"fp32", "bf16", "fp8", "int8"} - set(v)
        bad = {k: x for k, x in v.items() if not 0 <= x <= 1e19}
        if bad:
            raise ValueError(f"flops {bad} must be in [0, 1e19] FLOP/s")
        if v.get("fp32", 0) <= 0 and not missing:
            raise ValueError("flops.fp32 must be positive")
        if missing:
            raise ValueError(f"flops is missing {sorted(missing)} (use 0 where the dtype is unsupported)")
        return v

    @field_validator("kv_dtypes")
    @classmethod
    def _kv_dtypes(cls, v: list[str]) -> list[str]:
        bad = [d for d in v if d not in KV_DTYPES]
        if bad:
            raise ValueError(f"unknown kv_dtypes {bad}; allowed {list(KV_DTYPES)}")
        return v

    @property
    def spec(self) -> str:
        return self.name if self.gpus == 1 else f"{self.name}:{self.gpus}"

    @property
    def supports_fp8(self) -> bool:
        return "float8_e4m3fn" in self.kv_dtypes

    def peak_flops(self, dtype: str) -> float:
        key = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16", "float8_e4m3fn": "fp8"}.get(dtype, dtype)
        return self.flops.get(key, self.flops["fp32"]) or self.flops["fp32"]


def _target_dirs() -> list[Path]:
    return [d for d in (TARGET_DIR, _PKG_TARGET_DIR) if d.is_dir()]


def available() -> list[str]:
    names: set[str] = set()
    for d in _target_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


MAX_TARGET_BYTES = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def load_target(spec: str, gpus: int | None = None) -> Target:
    """Load ``NAME`` or ``NAME:N`` (a registered target), or a ``.yaml`` / ``.yml`` file path the user
    gave; ``gpus`` overrides N. Names never contain ``/`` or ``..``, so a name (e.g. one copied from a
    plan) can only select a shipped file. Raises TargetError with a one-line reason."""
    if not isinstance(spec, str) or not spec:
        raise TargetError(f"target {spec!r}: expected NAME, NAME:N or a .yaml file")
    if spec.endswith((".yaml", ".yml")) and ":" not in Path(spec).name:
        return load_target_file(Path(spec), gpus=gpus)
    name, colon, n = spec.partition(":")
    if not _NAME.fullmatch(name) or ".." in name:
        raise TargetError(f"target {spec[:80]!r}: a name is letters, digits, '.', '_', '-' (see `kvcompile targets`)")
    name = ALIASES.get(name, name)
    if colon and not n.isdigit():
        raise TargetError(f"target {spec[:80]!r}: GPU count after ':' must be an integer >= 1")
    count = gpus if gpus is not None else (int(n) if n else None)
    path = next((d / f"{name}.yaml" for d in _target_dirs() if (d / f"{name}.yaml").is_file()), None)
    if path is None:
        raise TargetError(f"unknown target {name!r}; available: {', '.join(available())}")
    return load_target_file(path, gpus=count)


def load_target_file(path: Path, gpus: int | None = None) -> Target:
    """A target from a YAML file (bounded size, plain scalars / lists / string-keyed mappings only)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TARGET_BYTES + 1)
    except OSError as e:
        raise TargetError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_TARGET_BYTES:
        raise TargetError(f"{path}: larger than {MAX_TARGET_BYTES} bytes")
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise TargetError(f"{path}: not UTF-8 text") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise TargetError(f"{path}: invalid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(raw, dict):
        raise TargetError(f"{path}: expected a mapping at top level")
    try:  # aliases may make a small file a huge tree; non-string keys cannot be fields
        check_json_shape(raw, max_depth=8, max_nodes=10_000)
    except JsonInputError as e:
        raise TargetError(f"{path}: {e}") from None
    if gpus is not None:
        raw["gpus"] = gpus
    try:
        return Target(**raw)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise TargetError(f"{path}: {errs}") from None
