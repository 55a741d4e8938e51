"""Hardware targets: datasheet numbers in ``targets/*.yaml``, loaded into a frozen pydantic model.

A spec is ``NAME`` or ``NAME:N`` (a node of N identical GPUs), e.g. ``h100-sxm:8``. Aliases such as
``h100`` map to a canonical file. Units are SI base units: bytes, bytes/s, FLOP/s, seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str
    source: str = Field(min_length=8, description="datasheet / document the numbers come from")
    kind: Literal["gpu", "cpu"]
    vendor: str
    memory_bytes: int = Field(gt=0)
    memory_bandwidth: float = Field(gt=0, description="bytes/s")
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


def load_target(spec: str, gpus: int | None = None) -> Target:
    """Load ``NAME`` or ``NAME:N``; ``gpus`` overrides N. Raises TargetError with a one-line reason."""
    name, _, n = spec.partition(":")
    name = ALIASES.get(name, name)
    count = gpus if gpus is not None else (int(n) if n.isdigit() else None)
    if n and not n.isdigit():
        raise TargetError(f"target {spec!r}: GPU count after ':' must be an integer")
    path = next((d / f"{name}.yaml" for d in _target_dirs() if (d / f"{name}.yaml").is_file()), None)
    if path is None:
        raise TargetError(f"unknown target {name!r}; available: {', '.join(available())}")
    return load_target_file(path, gpus=count)


def load_target_file(path: Path, gpus: int | None = None) -> Target:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise TargetError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise TargetError(f"{path}: expected a mapping at top level")
    if gpus is not None:
        raw["gpus"] = gpus
    try:
        return Target(**raw)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise TargetError(f"{path}: {errs}") from None
