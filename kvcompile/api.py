"""The compiler's front door: ``optimize(model, target) -> Plan``.

``optimize`` = load (if given a spec string) -> :func:`kvcompile.capture.capture` ->
:func:`kvcompile.passes.run_pipeline` -> :func:`plan_from_program`. The CLI's ``compile`` command
is a thin wrapper around it.

Example
-------
>>> import kvcompile                                                      # doctest: +SKIP
>>> plan = kvcompile.optimize("llama-3-70b", target="h100-sxm:8", context=8192)  # doctest: +SKIP
>>> plan.predicted["full_bf16_kv_bytes_per_token"]                        # doctest: +SKIP
327680
>>> plan.save("llama70b.kvplan")                                          # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from pydantic import ValidationError

from .capture import capture
from .ir import Program
from .models import Loaded, load
from .passes import PassContext, run_pipeline
from .plan import LayerPlan, ModelRef, Plan, PlanConfig, PlannerOptions, SettingsError, SiteRef, TargetRef
from .targets import Target, load_target

# Program.facts keys copied verbatim into the Plan field of the same name.
_FACT_FIELDS = ("measured", "placement", "schedule", "kernels")


def optimize(
    model: torch.nn.Module | str,
    target: str | Target = "h100",
    *,
    context: int = 4096,
    batch: int = 1,
    kv_budget: float | None = None,
    kv_budget_bytes: int | None = None,
    latency_budget_s: float | None = None,
    tolerance: float | None = None,
    objective: str = "min-damage",
    calibration: str | None = None,
    gpus: int | None = None,
    progress: bool = True,
    tokenizer: Any = None,
    engine: str | None = None,
    **options: Any,
) -> Plan:
    """Compile ``model`` for ``target`` into a sealed :class:`~kvcompile.plan.Plan`.

    Parameters
    ----------
    model : an ``nn.Module`` (transformers causal LM), a :class:`kvcompile.models.Loaded` (its name and
        tokenizer are used), or a spec for :func:`kvcompile.models.load` (``"smollm2-135m"``,
        ``"llama-3-70b"``, a ``.gguf`` / config ``.json`` / HF directory).
    target : target spec ``NAME`` or ``NAME:N`` (see ``kvcompile targets``) or a loaded Target.
    context, batch : the serving point the plan is built for (tokens per sequence, sequences).
    kv_budget : KV memory budget as a fraction of the full bf16 cache; ``kv_budget_bytes``: absolute.
    latency_budget_s, tolerance, objective, calibration : planner settings (see passes/README.md).
    gpus : GPUs in the node (overrides ``NAME:N``).
    progress : print one line per stage on stderr.
    tokenizer : the model's tokenizer (calibration and verification need one). When omitted it is
        found from a :class:`Loaded`, the GGUF file ``models.load`` read, or ``config._name_or_path``
        when that is a local directory. A real-weights model with a budget and no tokenizer raises,
        unless ``damage="priors"`` is passed (the plan then says it is unverified).
    options : extra pass options, passed through ``PassContext.options``; ``kv_dtype="bfloat16"`` accounts
        the cache in that dtype (plan a bf16 deployment while calibrating an fp32 copy of the model).

    Raises
    ------
    ValueError
        bad settings (naming the parameter); ``TargetError``, ``ModelLoadError``, ``CaptureError`` and
        ``PassError`` as raised by the stages.

    Example
    -------
    >>> plan = optimize("smollm2-135m", target="h100", context=4096, progress=False)  # doctest: +SKIP
    >>> plan.layers[0].heads[0]                                                        # doctest: +SKIP
    {'name': 'full', 'dtype': 'model'}
    """
    say = _Progress(progress)
    tgt = _resolve_target(target, gpus)
    if engine is not None:  # a serving engine: only its correct per-layer settings (kvcompile/engines)
        from .engines import get as get_engine
        from .passes.calibration_set import load_set

        # verified where it will be served: at the plan's context, >= 3 samples per family (user options win)
        defaults = get_engine(engine).verify_options(context, len(load_set(calibration).heldout))
        options = {**defaults, **options, "engine": engine, "max_kernels_per_layer": 1}
        if kv_budget is None and kv_budget_bytes is None and latency_budget_s is None:
            kv_budget = 1.0  # the engine's uncompressed setting still has to be chosen
    try:
        config = PlanConfig(
            context=context,
            batch=batch,
            kv_budget=kv_budget,
            kv_budget_bytes=kv_budget_bytes,
            latency_budget_s=latency_budget_s,
            tolerance=tolerance,
            objective=objective,
            calibration=calibration,
        )
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise SettingsError(f"{where}={first.get('input')!r}: {first['msg']}") from None
    planner_keys = set(PlannerOptions.model_fields) & set(options)
    if planner_keys:  # plan-changing options become typed, hashed fields of the config
        try:
            planner = PlannerOptions(**{k: options.pop(k) for k in sorted(planner_keys)})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise SettingsError(f"{where}={first.get('input')!r}: {first['msg']}") from None
        config = config.model_copy(update={"planner": planner})
    if kv_budget is not None and not 0 < kv_budget <= 1:
        raise SettingsError(f"kv_budget={kv_budget!r} must be a fraction in (0, 1]")
    if kv_budget_bytes is not None and kv_budget_bytes <= 0:
        raise SettingsError(f"kv_budget_bytes={kv_budget_bytes!r} must be positive")

    loaded = _resolve_model(model)
    if tokenizer is not None:
        loaded = Loaded(loaded.model, tokenizer, loaded.name)
    elif loaded.tokenizer is None:
        loaded = Loaded(loaded.model, find_tokenizer(loaded.model), loaded.name)
    _check_damage_source(loaded, config)
    say(f"model {loaded.name}")
    program = capture(loaded.model, name=loaded.name)
    if config.planner.kv_dtype is not None:
        program = _store_dtype(program, config.planner.kv_dtype)
    say(f"captured {program.num_layers} attention sites ({program.model.arch}, {program.model.dtype})")
    ctx = PassContext(
        target=tgt,
        config=config,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        progress=progress,
        options=dict(options),
    )
    program = run_pipeline(program, ctx)
    timings = dict(program.facts.get("pass_timings", {}))
    say("passes: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    plan = plan_from_program(program, ctx)
    if engine is not None:
        plan = plan.model_copy(update={"engine": get_engine(engine).record(plan, tgt)}).sealed()
    return plan


def plan_from_program(program: Program, ctx: PassContext) -> Plan:
    """Build the sealed Plan from a compiled Program.

    Mapping (passes that want something in the plan put it in ``program.facts``):

    * ``program.model`` + ``program.sites`` -> ``Plan.model`` (``ModelRef`` with one ``SiteRef``
      per site); ``program.assignment`` -> ``Plan.layers`` (one spec per KV head);
    * ``ctx.target`` -> ``Plan.target``; ``ctx.config`` -> ``Plan.config``;
    * ``facts["predicted"]`` -> ``Plan.predicted``, merged with values computed here from the
      assignment (these win, they are exact): ``kv_bytes_at_context`` (batch included),
      ``kv_bytes_per_token`` (= at-context bytes / (context * batch)), ``full_kv_bytes_at_context``
      (model dtype), ``full_bf16_kv_bytes_at_context``, ``full_kv_bytes_per_token`` and
      ``full_bf16_kv_bytes_per_token``;
    * ``facts["measured"|"placement"|"schedule"|"kernels"]`` -> the Plan field of that name;
    * ``facts["notes"]`` (list of str) -> ``Plan.notes``.
    """
    if program.assignment is None:
        raise ValueError("program has no strategy assignment: the pipeline must assign one spec per KV head")
    m = program.model
    model_ref = ModelRef(
        name=m.name,
        arch=m.arch,
        model_type=m.model_type,
        fingerprint=m.fingerprint,
        dtype=m.dtype,
        num_params=m.num_params,
        param_bytes=m.param_bytes,
        on_meta=m.on_meta,
        sites=[
            SiteRef(
                layer=s.layer,
                module_path=s.module_path,
                num_q_heads=s.num_q_heads,
                num_kv_heads=s.num_kv_heads,
                head_dim=s.head_dim,
                v_head_dim=s.v_head_dim,
                sliding_window=s.sliding_window,
            )
            for s in program.sites
        ],
    )
    t = ctx.target
    target_ref = TargetRef(
        name=t.name, gpus=t.gpus, memory_bytes=t.memory_bytes, memory_bandwidth=t.memory_bandwidth
    )
    layers = [
        LayerPlan(layer=i, heads=[dict(spec) for spec in row]) for i, row in enumerate(program.assignment)
    ]
    facts = program.facts
    fields: dict[str, Any] = {k: _plain(facts[k]) for k in _FACT_FIELDS if facts.get(k) is not None}
    notes = [str(n) for n in facts.get("notes", ())]
    plan = Plan(model=model_ref, target=target_ref, config=ctx.config, layers=layers, notes=notes, **fields)

    cfg = ctx.config
    at_ctx = plan.predicted_kv_bytes(cfg.context, cfg.batch)
    predicted = dict(_plain(facts.get("predicted", {})))
    predicted.update(
        kv_bytes_at_context=at_ctx,
        kv_bytes_per_token=at_ctx / (cfg.context * cfg.batch),
        full_kv_bytes_at_context=plan.full_kv_bytes(cfg.context, cfg.batch),
        full_bf16_kv_bytes_at_context=plan.full_kv_bytes(cfg.context, cfg.batch, dtype="bfloat16"),
        full_kv_bytes_per_token=program.full_kv_bytes_per_token(),
        full_bf16_kv_bytes_per_token=program.full_kv_bytes_per_token("bfloat16"),
    )
    return plan.model_copy(update={"predicted": predicted}).sealed()


# ---- helpers ---------------------------------------------------------------------------------------
def _resolve_target(target: str | Target, gpus: int | None) -> Target:
    if isinstance(target, Target):
        return target if gpus is None else target.model_copy(update={"gpus": gpus})
    if not isinstance(target, str):
        raise ValueError(f"target={target!r} must be a target name such as 'h100-sxm' or 'h100-sxm:8'")
    if gpus is not None and gpus < 1:
        raise SettingsError(f"gpus={gpus!r} must be >= 1")
    return load_target(target, gpus=gpus)


def _resolve_model(model: torch.nn.Module | str) -> Loaded:
    if isinstance(model, str):
        return load(model)
    if isinstance(model, Loaded):
        return model
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be an nn.Module or a model spec string, got {type(model).__name__}")
    cfg = getattr(model, "config", None)
    name = (getattr(cfg, "name_or_path", "") or getattr(cfg, "model_type", "")) if cfg else ""
    return Loaded(model, None, name or type(model).__name__)


def _store_dtype(program: Program, kv_dtype: Any) -> Program:
    """Account the cache as stored in ``kv_dtype`` (e.g. a bf16 deployment planned on an fp32 copy of the
    model: calibration runs in fp32, every byte count of the plan is for ``kv_dtype``)."""
    import dataclasses

    from .ir import DTYPE_BYTES

    name = str(kv_dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16") or name not in DTYPE_BYTES:
        raise SettingsError(f"kv_dtype={kv_dtype!r} must be 'float32', 'bfloat16' or 'float16'")
    # the plan is for a model whose cache is kv_dtype: the model record says so too (bytes are checked against
    # it on load); make_cache on the calibration copy notes the dtype difference (PlanWarning)
    return dataclasses.replace(program, model=dataclasses.replace(program.model, dtype=name),
                               sites=tuple(dataclasses.replace(s, dtype=name) for s in program.sites))


def find_tokenizer(model: torch.nn.Module) -> Any | None:
    """The tokenizer a real-weights model came with, or None: the GGUF file ``models.load`` recorded
    (``model.kvcompile_source``), else ``config._name_or_path`` / ``model.name_or_path`` when it is a
    local directory holding tokenizer files (or exactly one ``.gguf``)."""
    from pathlib import Path

    src = getattr(model, "kvcompile_source", None)
    cfg = getattr(model, "config", None)
    paths = [src, getattr(cfg, "_name_or_path", None), getattr(model, "name_or_path", None)]
    for p in filter(None, paths):
        path = Path(str(p))
        try:
            from transformers import AutoTokenizer

            if path.suffix == ".gguf" and path.is_file():
                return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            if not path.is_dir():
                continue
            if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
                return AutoTokenizer.from_pretrained(str(path))
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return AutoTokenizer.from_pretrained(str(path), gguf_file=ggufs[0].name)
        except (OSError, ValueError):
            continue
    return None


def _check_damage_source(loaded: Loaded, config: PlanConfig) -> None:
    """A budget on a real-weights model needs measured damage, hence a tokenizer; never fall back silently."""
    from .passes.candidates import needs_solve

    damage = config.planner.damage
    on_meta = any(p.is_meta for p in loaded.model.parameters())
    if on_meta or damage == "priors" or not needs_solve(config) or loaded.tokenizer is not None:
        return
    raise SettingsError(
        f"model {loaded.name!r} has real weights but no tokenizer was found, so the budget's damage cannot be "
        "calibrated: pass tokenizer=... (or damage='priors' for an unverified plan from literature priors)"
    )


def _plain(value: Any) -> Any:
    """Mapping proxies / tuples from frozen IR facts -> plain JSON containers."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Progress:
    """One line per stage on stderr with the time since start (silent when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.t0 = enabled, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[kvcompile {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)
