"""Capture: lower a transformers causal LM to an :class:`~kvcompile.ir.Program` via ``torch.export``.

The model is exported non-strictly under ``torch.no_grad()`` with ``use_cache=False`` on an
``example_len``-token input (meta input ids when the model lives on the ``meta`` device). Structure is
read from the exported graph, not assumed from the config:

* every ``aten.scaled_dot_product_attention`` node is one attention site; its owning module (path and
  class) comes from ``node.meta["nn_module_stack"]`` and its layer index from the path
  (``model.layers.3.self_attn`` -> 3);
* ``num_q_heads``/``head_dim`` come from the SDPA query's shape, ``v_head_dim`` from the value's;
* ``num_kv_heads`` (what the cache stores) comes from the key: with ``enable_gqa=True`` it is the key's
  head count; otherwise the key is walked back through ``repeat_kv`` (unsqueeze -> expand -> reshape),
  and the 5-d ``expand`` gives ``[B, Hkv, G, T, D]``. The k/v projection (``k_proj`` out_features /
  head_dim, or a fused ``qkv_proj``/``c_attn``) cross-checks that count;
* ``scale`` is the SDPA ``scale`` kwarg (default ``1/sqrt(head_dim)``); ``dtype`` is the key's dtype;
* positions: RoPE when the graph computes sin/cos (theta from ``config.rope_parameters``), learned when
  an embedding is indexed by something other than the input ids (GPT-2's ``wpe``), ALiBi when the
  config says so, else none.

Sliding windows are not visible in a ``use_cache=False`` graph (they live in the mask), so they come
from the attention module's ``sliding_window`` attribute when it has one (Gemma-2, Qwen2), else from
``config.layer_types`` + ``config.sliding_window`` (Mistral, Phi-3). Every graph-derived count is
cross-checked with the config; a disagreement raises :class:`CaptureError`.

Models whose attention does not go through SDPA (``eager``, or models such as Gemma-2 that refuse
``sdpa``) are re-exported once with a registered capture attention function (HF
``AttentionInterface``) that calls SDPA with ``enable_gqa=True`` and the module's ``scaling``; the
model's own attention implementation is restored afterwards. That graph is only read, never run.

Deep meta-device models (more than ``_FULL_DEPTH_MAX`` layers, e.g. Llama-3-70B) are exported as a
reduced-depth copy holding the shortest prefix of layers that covers every distinct layer type
(``config.layer_types``); each real layer takes the graph-read structure of the prefix layer of the
same type. Export time then no longer grows with depth (70B: ~0.5 s instead of ~10 s).

What the graph says (sites and positions) is memoised under ``models.cache_dir()/capture``, keyed on
everything the graph depends on (:func:`_facts_key`); a warm compile then skips the export. The
config-derived facts (windows, cross-checks, model info) are recomputed every time.

Example
-------
>>> from kvcompile.models import load                     # doctest: +SKIP
>>> program = capture(load("smollm2-135m").model)         # doctest: +SKIP
>>> program.sites[0].num_q_heads, program.sites[0].num_kv_heads, program.sites[0].head_dim  # doctest: +SKIP
(9, 3, 64)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import sys
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.export

from .ir import AttentionSite, ModelInfo, PosKind, Program, verify
from .models import fingerprint

_FULL_DEPTH_MAX = 8
_CAPTURE_ATTN = "kvcompile_capture"
_SHAPE_OPS = {"reshape", "view", "_unsafe_view", "expand", "unsqueeze", "clone", "contiguous", "alias"}
_K_PROJ = {"k_proj", "key", "k", "wk", "to_k", "k_lin"}
_V_PROJ = {"v_proj", "value", "v", "wv", "to_v", "v_lin"}
_FUSED_PROJ = {"qkv_proj", "c_attn", "query_key_value", "wqkv", "qkv", "w_pack", "in_proj"}
_LINEAR_OPS = {"linear", "addmm", "mm", "matmul"}


class CaptureError(ValueError):
    """The model cannot be captured; the message names the model class and what was not found."""


@dataclasses.dataclass(frozen=True)
class _ReadSite:
    """What the graph says about one attention module (before per-layer config facts are added)."""

    layer: int
    module_path: str
    module_class: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: str
    scale: float


def capture(model: torch.nn.Module, *, example_len: int = 8, name: str | None = None) -> Program:
    """Export ``model`` and return its attention sites and model facts as a verified Program.

    Parameters
    ----------
    model : a transformers causal LM (real weights or on the ``meta`` device).
    example_len : tokens in the example input used for export (>= 2).
    name : model name recorded in the IR (default: ``config.name_or_path`` or ``config.model_type``).

    Raises
    ------
    CaptureError
        one line naming the model class and what was not found (no config, export failure, no
        attention nodes, graph/config disagreement).
    """
    if example_len < 2:
        raise ValueError(f"example_len={example_len} must be >= 2")
    cls = type(model).__name__
    config: Any = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise CaptureError(f"{cls}: unsupported model: no transformers `config` with num_hidden_layers found")
    num_layers = int(config.num_hidden_layers)
    on_meta = any(p.is_meta for p in model.parameters())
    types = _layer_types(config, num_layers)

    probe: Any = model
    rep = list(range(num_layers))
    if on_meta and num_layers > _FULL_DEPTH_MAX:
        depth, rep = _reduced_plan(types)
        probe = _reduced_copy(model, depth, types)
    read, pos, theta = _graph_facts(probe, example_len, config, cls)
    windows = _sliding_windows(model, config, types, num_layers)

    sites = []
    for i in range(num_layers):
        r = read[rep[i]]
        path = r.module_path if rep[i] == i else _with_layer(r.module_path, r.layer, i)
        sites.append(
            AttentionSite(
                layer=i,
                module_path=path,
                num_q_heads=r.num_q_heads,
                num_kv_heads=r.num_kv_heads,
                head_dim=r.head_dim,
                v_head_dim=r.v_head_dim,
                pos=pos,
                rope_theta=theta,
                sliding_window=windows[i],
                dtype=r.dtype,
                scale=r.scale,
            )
        )
    _cross_check(sites, config, cls)
    info = ModelInfo(
        name=name or getattr(config, "name_or_path", "") or config.model_type,
        arch=cls,
        model_type=str(config.model_type),
        fingerprint=fingerprint(model),
        num_params=sum(p.numel() for p in model.parameters()),
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size),
        num_layers=num_layers,
        dtype=sites[0].dtype,
        on_meta=on_meta,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
    )
    return verify(Program(model=info, sites=tuple(sites)))


# ---- export ------------------------------------------------------------------------------------
def _graph_facts(probe: Any, example_len: int, config: Any, cls: str) -> tuple[list[_ReadSite], PosKind, float | None]:
    """Sites and positions read from ``probe``'s exported graph, memoised on disk (``_facts_key``):
    export is most of a warm compile (~5 s of SmolLM2's ~9 s). Only successful reads are stored."""
    from ._io import write_atomic
    from .models import cache_dir

    try:
        path: Path | None = cache_dir() / "capture" / f"{_facts_key(probe, example_len)}.json"
    except (AttributeError, TypeError, StopIteration):
        path = None  # not a transformers config / no parameters: nothing to key on, export every time
    try:
        if path is not None:
            data = json.loads(path.read_text())
            return [_ReadSite(**r) for r in data["read"]], PosKind(data["pos"]), data["theta"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no entry, or a torn / foreign one: export again
    read, graph = _export_and_read(probe, example_len)
    if len(read) != probe.config.num_hidden_layers:
        raise CaptureError(
            f"{cls}: found {len(read)} attention sites in the graph but config.num_hidden_layers="
            f"{probe.config.num_hidden_layers}"
        )
    pos, theta = _positions(graph, config, cls)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"read": [dataclasses.asdict(r) for r in read], "pos": pos.value,
                                           "theta": theta}))
        except OSError:
            pass  # a read-only cache only costs the next compile an export
    return read, pos, theta


def _facts_key(probe: Any, example_len: int) -> str:
    """What the exported graph depends on: the model class, its config, parameter dtype and device
    (``fingerprint``: config + a weight digest), the attention implementation, the export input, the
    torch / transformers versions and this module's own code."""
    import transformers

    first = next(iter(probe.parameters()))
    body = {
        "class": f"{type(probe).__module__}.{type(probe).__qualname__}", "fp": fingerprint(probe),
        "dtype": str(first.dtype), "device": first.device.type, "example_len": example_len,
        "attn": str(getattr(probe.config, "_attn_implementation", None)),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]


def _export(model: torch.nn.Module, example_len: int) -> torch.fx.Graph:
    device = next(iter(model.parameters())).device
    ids = torch.zeros(1, example_len, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (ids,), kwargs={"use_cache": False}, strict=False)
    except Exception as e:  # export failures are many types; report one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        cls = type(model).__name__
        raise CaptureError(f"{cls}: torch.export failed ({type(e).__name__}: {first})") from e
    return ep.graph


def _export_and_read(model: Any, example_len: int) -> tuple[list[_ReadSite], torch.fx.Graph]:
    current = getattr(model.config, "_attn_implementation", None)
    swappable = hasattr(model, "set_attn_implementation")
    nodes: list[torch.fx.Node] = []
    if current != "eager" or not swappable:  # an eager graph has no SDPA node: skip straight to the swap
        graph = _export(model, example_len)
        nodes = _sdpa_nodes(graph)
    if not nodes and swappable:
        _register_capture_attention()
        model.set_attn_implementation(_CAPTURE_ATTN)
        try:
            graph = _export(model, example_len)
        finally:
            model.set_attn_implementation(current)
        nodes = _sdpa_nodes(graph)
    if not nodes:
        raise CaptureError(
            f"{type(model).__name__}: no attention found: the exported graph has no "
            f"scaled_dot_product_attention node (attn_implementation={current!r}) and re-export with "
            "the capture attention did not produce one"
        )
    read = [_read_site(graph, n) for n in nodes]
    read.sort(key=lambda r: r.layer)
    layers = [r.layer for r in read]
    if layers != list(range(len(read))):
        raise CaptureError(f"{type(model).__name__}: attention layer indices {layers} are not 0..L-1")
    return read, graph


def _register_capture_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_CAPTURE_ATTN, _capture_attention)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA stand-in for attention implementations export cannot see (traced, never used for outputs).

    Softcapping and other score modifiers are dropped: only shapes, scale and GQA matter here.
    """
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


# ---- reading the graph -------------------------------------------------------------------------
def _op(node: torch.fx.Node) -> str:
    """``aten.expand.default`` -> ``expand``; other callables -> their name."""
    if node.op != "call_function":
        return ""
    parts = str(node.target).split(".")
    if len(parts) >= 2 and parts[0] == "aten":
        return parts[1]
    return getattr(node.target, "__name__", str(node.target))


def _sdpa_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    names = ("scaled_dot_product_attention", "_scaled_dot_product_attention")
    return [n for n in graph.nodes if _op(n) in names]


def _module(node: torch.fx.Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module that emitted ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name


def _val(node: Any) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _layer_of(path: str) -> int | None:
    nums = [int(p) for p in path.split(".") if p.isdigit()]
    return nums[-1] if nums else None


def _with_layer(path: str, old: int, new: int) -> str:
    return re.sub(rf"(^|\.){old}(\.|$)", rf"\g<1>{new}\g<2>", path, count=1)


def _kv_heads_from_key(sdpa: torch.fx.Node, k: torch.fx.Node) -> int:
    """Heads of the key as cached: undo ``repeat_kv`` (unsqueeze -> expand [B,Hkv,G,T,D] -> reshape)."""
    kv = _val(k)
    assert kv is not None  # checked by the caller
    if sdpa.kwargs.get("enable_gqa") or (len(sdpa.args) > 7 and sdpa.args[7]):
        return int(kv.shape[1])
    cur: Any = k
    for _ in range(12):
        if not isinstance(cur, torch.fx.Node) or _op(cur) not in _SHAPE_OPS:
            break
        v = _val(cur)
        if _op(cur) == "expand" and v is not None and v.dim() == 5:
            return int(v.shape[1])
        cur = cur.args[0]
    return int(kv.shape[1])


def _projection_kv_heads(graph: torch.fx.Graph, attn_path: str, hq: int, d: int, dv: int) -> int | None:
    """KV heads implied by the k (or fused qkv) projection feeding an attention module, if found."""
    k_out = fused_out = None
    for n in graph.nodes:
        if _op(n) not in _LINEAR_OPS:
            continue
        path, _ = _module(n)
        if not path.startswith(attn_path + "."):
            continue
        leaf = path[len(attn_path) + 1 :].lower()
        v = _val(n)
        if v is None:
            continue
        if leaf in _K_PROJ:
            k_out = int(v.shape[-1])
        elif leaf in _FUSED_PROJ:
            fused_out = int(v.shape[-1])
    if k_out is not None:
        return k_out // d if k_out % d == 0 else -1
    if fused_out is not None:
        rest = fused_out - hq * d
        return rest // (d + dv) if rest > 0 and rest % (d + dv) == 0 else -1
    return None


def _read_site(graph: torch.fx.Graph, node: torch.fx.Node) -> _ReadSite:
    path, cls = _module(node)
    layer = _layer_of(path)
    q, k, v = (_val(a) for a in node.args[:3])
    if q is None or k is None or v is None or q.dim() != 4:
        raise CaptureError(f"{cls or 'model'}: SDPA node {node.name} in {path!r} has no 4-d q/k/v shapes")
    if layer is None:
        raise CaptureError(f"{cls}: attention module path {path!r} has no layer index")
    hq, d, dv = int(q.shape[1]), int(q.shape[-1]), int(v.shape[-1])
    k_node = node.args[1]
    if not isinstance(k_node, torch.fx.Node):
        raise CaptureError(f"{cls}: SDPA node {node.name} in {path!r} has no key input node")
    hkv = _kv_heads_from_key(node, k_node)
    proj = _projection_kv_heads(graph, path, hq, d, dv)
    if proj is not None and proj != hkv:
        raise CaptureError(
            f"{cls}: layer {layer} ({path}): the k/v projection implies {proj} KV heads "
            f"but the SDPA key has {hkv}"
        )
    scale = node.kwargs.get("scale")
    if scale is None and len(node.args) > 6:
        scale = node.args[6]
    return _ReadSite(
        layer=layer,
        module_path=path,
        module_class=cls,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        v_head_dim=dv,
        dtype=str(k.dtype).removeprefix("torch."),
        scale=float(scale) if isinstance(scale, (int, float)) else 1.0 / math.sqrt(d),
    )


def _positions(graph: torch.fx.Graph, config: Any, cls: str) -> tuple[PosKind, float | None]:
    """Positional scheme read from the graph (sin/cos -> RoPE; position-indexed embedding -> learned)."""
    if getattr(config, "alibi", False) or config.model_type in ("bloom",):
        return PosKind.ALIBI, None
    ops = {_op(n) for n in graph.nodes}
    if {"sin", "cos"} <= ops:
        return PosKind.ROPE, _rope_theta(config)
    placeholders = {n for n in graph.nodes if n.op == "placeholder" and n.name.endswith("input_ids")}
    for n in graph.nodes:
        if _op(n) == "embedding" and len(n.args) > 1 and n.args[1] not in placeholders:
            return PosKind.LEARNED, None
    return PosKind.NONE, None


def _rope_theta(config: Any) -> float | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        # per-layer-type parameters (e.g. {"full_attention": {...}, "sliding_attention": {...}})
        if "rope_theta" not in params:
            params = next((p for p in params.values() if isinstance(p, dict) and "rope_theta" in p), {})
        if "rope_theta" in params:
            return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


# ---- per-layer facts from modules / config -------------------------------------------------------
def _layer_types(config: Any, num_layers: int) -> list[str | None]:
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == num_layers:
        return list(types)
    return [None] * num_layers


def _sliding_windows(
    model: torch.nn.Module, config: Any, types: list[str | None], n: int
) -> list[int | None]:
    """Per-layer window: attention module attribute if present, else layer_types + config.sliding_window."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    out: list[int | None] = []
    for i in range(n):
        t = types[i]
        w = window if (t is None or t == "sliding_attention") else None
        out.append(int(w) if w else None)
    attrs = _module_windows(model, n)
    return [attrs[i] if i in attrs else out[i] for i in range(n)]


def _module_windows(model: torch.nn.Module, n: int) -> dict[int, int | None]:
    found: dict[int, int | None] = {}
    for path, mod in model.named_modules():
        if "sliding_window" in vars(mod) and (layer := _layer_of(path)) is not None and layer < n:
            w = vars(mod)["sliding_window"]
            found[layer] = int(w) if isinstance(w, int) and w > 0 else None
    return found


def _cross_check(sites: Iterable[AttentionSite], config: Any, cls: str) -> None:
    hq = getattr(config, "num_attention_heads", None)
    hkv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or hq
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        hkv = 1  # Falcon-7B style multi-query attention
    d = getattr(config, "head_dim", None) or (config.hidden_size // hq if hq else None)
    for s in sites:
        for what, graph_v, cfg_v in (("query heads", s.num_q_heads, hq), ("KV heads", s.num_kv_heads, hkv),
                                     ("head_dim", s.head_dim, d)):
            if cfg_v is not None and int(cfg_v) != graph_v:
                raise CaptureError(
                    f"{cls}: layer {s.layer} ({s.module_path}): graph has {graph_v} {what} "
                    f"but the config says {cfg_v}"
                )


# ---- reduced-depth export for deep meta models ----------------------------------------------------
def _reduced_plan(types: list[str | None]) -> tuple[int, list[int]]:
    """Depth of the shortest prefix covering every layer type (>= 2), and layer -> representative."""
    first: dict[str | None, int] = {}
    for i, t in enumerate(types):
        first.setdefault(t, i)
    depth = max(2, max(first.values()) + 1)
    return depth, [first[t] for t in types]


def _reduced_copy(model: Any, depth: int, types: list[str | None]) -> torch.nn.Module:
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = depth
    if types[0] is not None:
        cfg.layer_types = types[:depth]
    dtype = next(iter(model.parameters())).dtype
    cls: Any = type(model)
    with torch.device("meta"):
        reduced = cls._from_config(cfg, dtype=dtype)
    return reduced.eval()


class _CallableModule(types.ModuleType):
    """``kvcompile.capture`` is both the package-level function and this module's name; importing this
    module rebinds the package attribute to the module, so the module itself forwards calls to
    :func:`capture` and ``kvcompile.capture(model)`` works whatever was imported first."""

    def __call__(self, model: torch.nn.Module, **kw: Any) -> Program:
        return capture(model, **kw)


sys.modules[__name__].__class__ = _CallableModule
