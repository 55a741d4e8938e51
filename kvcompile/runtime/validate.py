"""Check that a plan fits a model before any token is generated.

Everything here reads the model's *config* (layer count, query/KV heads, head_dim) and the plan's
recorded sites; nothing runs the model. Mismatches that make the cache wrong raise
:class:`~kvcompile.plan.PlanError`; mismatches that only make the plan's provenance doubtful (another
fingerprint, another dtype: plans may be compiled from a meta config) become notes, which
``strict=True`` turns into errors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..models import fingerprint
from ..plan import Plan, PlanError
from ..strategies import Strategy


@dataclasses.dataclass(frozen=True, slots=True)
class Geometry:
    """Attention shape of a decoder-only model, read from its config (same for every layer)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def gqa(self) -> int:
        """Query heads per KV head."""
        return self.num_q_heads // self.num_kv_heads


def model_geometry(model: Any) -> Geometry:
    """Read layer count, head counts and head_dim from ``model.config`` (Llama- and GPT-2-style names)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise PlanError(f"{type(model).__name__} has no .config; kvcompile needs a transformers model")
    try:
        layers = int(cfg.num_hidden_layers)
        q_heads = int(cfg.num_attention_heads)
    except AttributeError as e:
        raise PlanError(f"model config lacks {e.name!r}; cannot check the plan against it") from None
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or q_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // max(q_heads, 1)
    if layers < 1 or q_heads < 1 or kv_heads < 1 or int(head_dim) < 1:
        raise PlanError(f"model config has {layers} layers, {q_heads} query / {kv_heads} KV heads, head_dim {head_dim}")
    if q_heads % kv_heads:
        raise PlanError(f"model has {q_heads} query heads, not a multiple of its {kv_heads} KV heads")
    return Geometry(layers, q_heads, kv_heads, int(head_dim))


def check_plan(plan: Plan, model: Any, *, strict: bool = False) -> tuple[list[list[Strategy]], list[str]]:
    """Validate ``plan`` against ``model``; return ``(strategies[layer][kv_head], notes)``.

    Raises PlanError (a ValueError) naming the layer/head and the mismatch: layer count, head counts
    or head_dim differ from ``model.config``; an unknown strategy or bad parameters; a strategy that
    does not fit the site or the plan's context (``Strategy.validate_for``, e.g. a window larger than
    the context). With ``strict=True`` a fingerprint or dtype mismatch is an error too.
    """
    geo = model_geometry(model)
    sites = plan.model.sites
    if len(plan.layers) != geo.num_layers or len(sites) != geo.num_layers:
        raise PlanError(
            f"plan has {len(plan.layers)} layers ({len(sites)} sites) but the model has {geo.num_layers}; "
            "the plan was compiled for another model"
        )
    for i, (site, lp) in enumerate(zip(sites, plan.layers, strict=True)):
        where = f"layer {i}"
        if lp.layer != i or site.layer != i:
            raise PlanError(f"{where}: plan layers must be listed in order 0..L-1, found layer {lp.layer}")
        if len(lp.heads) != geo.num_kv_heads or site.num_kv_heads != geo.num_kv_heads:
            raise PlanError(
                f"{where}: plan has {len(lp.heads)} KV-head strategies (site says {site.num_kv_heads}) "
                f"but the model has {geo.num_kv_heads} KV heads"
            )
        if site.num_q_heads != geo.num_q_heads:
            raise PlanError(
                f"{where}: plan has {site.num_q_heads} query heads, the model has {geo.num_q_heads}"
            )
        if site.head_dim != geo.head_dim or site.v_head_dim != geo.head_dim:
            raise PlanError(
                f"{where}: plan head_dim {site.head_dim} (v {site.v_head_dim}) "
                f"!= model head_dim {geo.head_dim}"
            )
    strategies = plan.strategies()  # PlanError on unknown names / bad parameters
    for i, row in enumerate(strategies):
        for h, s in enumerate(row):
            try:
                s.validate_for(head_dim=geo.head_dim, context=plan.config.context)
            except ValueError as e:
                raise PlanError(f"layer {i} head {h}: {s.label()}: {e}") from None

    notes = check_model(plan, model, strict=strict)  # fingerprint / dtype provenance
    return strategies, notes


def check_model(plan: Plan, model: Any, *, strict: bool = False) -> list[str]:
    """``make_cache``'s provenance gate: may this plan serve ``model`` (a transformers model)?

    Runs the plan's own invariants (:meth:`Plan.verify`, without the derived fields: an in-memory
    plan may have been edited with ``model_copy``), then compares provenance. A plan compiled from
    real weights (``model.on_meta`` false) was calibrated and byte-counted on exactly those weights
    and dtype, so another fingerprint or dtype is refused with a PlanError. A plan compiled from a
    meta config cannot know the weights: a differing fingerprint or dtype is returned as a note
    (``strict=True`` refuses it too). Geometry is checked by ``runtime.validate.check_plan``.
    """
    plan.verify(derived=False)
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    model_dtype = str(params[0].dtype).removeprefix("torch.") if params else plan.model.dtype
    fp = fingerprint(model)
    problems = []
    if plan.model.dtype != model_dtype:
        problems.append(f"plan was compiled for dtype {plan.model.dtype}, the model runs in {model_dtype}")
    notes = []
    if plan.model.fingerprint != fp:
        msg = f"model fingerprint {fp} differs from the plan's {plan.model.fingerprint[:40]}"
        if any(hasattr(p, "to_local") for p in params):  # a tensor-parallel rank hashes only its shards
            notes.append(msg + " (tensor-parallel rank: the fingerprint covers only its own shards)")
        else:
            problems.append(msg)
    if problems and not plan.model.on_meta:
        raise PlanError("plan does not match the model: " + "; ".join(problems)
                        + " (the plan was compiled from other real weights; recompile it for this model)")  # fmt: skip
    notes += [p + " (expected when the plan was compiled from a meta config; predicted bytes use the plan's dtype)"
              for p in problems]  # fmt: skip
    if strict and notes:
        raise PlanError("strict plan check failed: " + "; ".join(notes))
    return notes
