"""Build plans straight from a model's config, without capture or the solver.

For tests, evaluation baselines and hand-written plans: :func:`uniform_plan` gives every KV head the
same strategy, :func:`mixed_plan` cycles a list of strategies over the KV heads of each layer (so
heads of one layer use different strategies), :func:`plan_for` takes any ``(layer, head) -> spec``.

Example
-------
>>> plan = uniform_plan(model, {"name": "full"}, context=4096)            # doctest: +SKIP
>>> plan = mixed_plan(model, ["full", {"name": "quant", "bits": 2}])      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..plan import LayerPlan, ModelRef, Plan, PlanConfig, SiteRef, TargetRef
from ..strategies import Strategy, from_spec
from .validate import model_geometry

SpecLike = Strategy | Mapping[str, Any] | str


def as_spec(spec: SpecLike) -> dict[str, Any]:
    """Normalise a strategy, a spec dict or a bare name to a validated spec dict."""
    if isinstance(spec, Strategy):
        return spec.to_spec()
    if isinstance(spec, str):
        spec = {"name": spec}
    return from_spec(spec).to_spec()  # ValueError on unknown names / bad parameters


def hf_model(model: Any) -> Any:
    """The transformers model inside a :class:`kvcompile.models.Loaded`, or ``model`` itself."""
    return model if hasattr(model, "config") else model.model


def model_ref(model: Any, name: str | None = None) -> ModelRef:
    """The plan's record of ``model``: config facts, fingerprint and one SiteRef per layer."""
    from ..models import fingerprint

    model = hf_model(model)
    geo = model_geometry(model)
    cfg = model.config
    paths = [
        n for n, m in model.named_modules() if "Attention" in type(m).__name__ and hasattr(m, "layer_idx")
    ]
    if len(paths) != geo.num_layers:
        paths = [f"layers.{i}.attn" for i in range(geo.num_layers)]
    params = list(model.parameters())
    dtype = str(params[0].dtype).removeprefix("torch.")
    sites = [
        SiteRef(
            layer=i,
            module_path=paths[i],
            num_q_heads=geo.num_q_heads,
            num_kv_heads=geo.num_kv_heads,
            head_dim=geo.head_dim,
            v_head_dim=geo.head_dim,
            sliding_window=getattr(cfg, "sliding_window", None),
        )
        for i in range(geo.num_layers)
    ]
    return ModelRef(
        name=name or getattr(cfg, "_name_or_path", "") or cfg.model_type,
        arch=type(model).__name__,
        model_type=cfg.model_type,
        fingerprint=fingerprint(model),
        dtype=dtype,
        num_params=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        on_meta=params[0].device.type == "meta",
        sites=sites,
    )


def _target_ref(target: str | TargetRef) -> TargetRef:
    if isinstance(target, TargetRef):
        return target
    from ..targets import load_target  # data only (yaml); no compiler code

    t = load_target(target)
    return TargetRef(
        name=t.spec, gpus=t.gpus, memory_bytes=t.memory_bytes, memory_bandwidth=t.memory_bandwidth
    )


def plan_for(
    model: Any,
    heads: Callable[[int, int], SpecLike],
    context: int = 4096,
    *,
    target: str | TargetRef = "h100",
    name: str | None = None,
    batch: int = 1,
) -> Plan:
    """A sealed plan whose KV head ``h`` of layer ``l`` uses ``heads(l, h)``.

    ``model`` is an HF model or a :class:`kvcompile.models.Loaded`. ``predicted`` records the exact
    KV bytes at ``context`` from the strategies' ``bytes_for``.
    """
    if name is None and not hasattr(model, "config"):
        name = getattr(model, "name", None)  # a Loaded carries the spec name ("smollm2-135m")
    model = hf_model(model)
    ref = model_ref(model, name)
    layers = [
        LayerPlan(layer=s.layer, heads=[as_spec(heads(s.layer, h)) for h in range(s.num_kv_heads)])
        for s in ref.sites
    ]
    plan = Plan(
        model=ref,
        target=_target_ref(target),
        config=PlanConfig(context=context, batch=batch),
        layers=layers,
        notes=["hand-built plan (kvcompile.runtime.builders), not compiled"],
    )
    predicted = {"kv_bytes": plan.predicted_kv_bytes(), "full_kv_bytes": plan.full_kv_bytes()}
    return plan.model_copy(update={"predicted": predicted}).sealed()


def uniform_plan(model: Any, spec: SpecLike = "full", context: int = 4096, **kw: Any) -> Plan:
    """Every KV head of every layer uses ``spec``."""
    s = as_spec(spec)
    return plan_for(model, lambda _layer, _head: s, context, **kw)


def mixed_plan(model: Any, specs: Sequence[SpecLike], context: int = 4096, **kw: Any) -> Plan:
    """KV head ``h`` of every layer uses ``specs[h % len(specs)]`` (heads of one layer differ)."""
    if not specs:
        raise ValueError("specs must name at least one strategy")
    ss = [as_spec(s) for s in specs]
    return plan_for(model, lambda _layer, h: ss[h % len(ss)], context, **kw)
