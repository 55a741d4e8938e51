"""Calibration: how much each candidate strategy damages each KV head, measured on the real model.

For every (layer, KV head, candidate) the pass estimates the increase of the model's loss on the
scored tokens of each calibration sample (the pass-key digits of retrieval samples, the last tokens
of prose samples) when only that head's cache is the candidate's store:

    damage[l, h, c] = 1/2 * sum_{t, q in group(h)} ||g[l, q, t]||^2 * ||delta[l, q, t, c]||^2 / D

* ``delta``: the error of the attention output of query head ``q`` at observation position ``t``
  (question-agnostic: the sample's context is ``attend``-ed and ``append``-ed into the candidate's own
  ``Store`` first, then the observation queries — the question, answer prefix and answer, or the last
  prose tokens — attend over the compressed context plus themselves), against full attention
  (``reference_attention``). All KV heads of a layer share one store per candidate (stores treat heads
  independently).
* ``g``: the gradient of the summed NLL of the scored tokens with respect to that attention output
  (one backward pass per sample over the observation tokens, on top of the cached context). The
  product is the diagonal empirical-Fisher estimate of the loss increase (nats) for an error of that
  size; it is large exactly where the answer depends on the head (retrieval heads) and small where it
  does not, whatever the error. Damages are aggregated over samples as mean + standard deviation
  (:func:`robust_damage`). ``sensitivity[l]`` (reported) is the same with ``delta`` replaced by the
  output itself.

q/k/v (post-RoPE) are recorded through a registered attention function
(``AttentionInterface.register("kvcompile_calibrate", ...)`` + ``model.set_attn_implementation``, the
previous implementation is restored afterwards) that wraps transformers' own sdpa attention.

Candidates are defined at the plan's context ``C``; calibration runs at the set's sample length ``L``,
so each candidate is calibrated as its twin in the default grid built for ``L`` (same kept fraction),
or with its token-count parameters (``window``, ``budget``, ``recent``, ``decode_window``) rescaled by
``L / C`` (:func:`calibration_twins`). Results are cached as JSON under ``models.cache_dir()/calibration``
keyed by model fingerprint + calibration set digest + rescaled candidate specs + settings.

Models on the meta device cannot be run: damage then comes from literature priors per strategy
family (:func:`prior_damage`), labelled ``source = "priors"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from .._compat import cache_kw
from ..ir import Damage, Program
from ..strategies import Full, Strategy, from_spec, reference_attention
from ..strategies._select import SelectStore
from ._workers import fork_map, worker_count
from .calibration_set import CalibrationSample, build_sample, load_set
from .context import PassContext, contract

log = logging.getLogger("kvcompile.passes.calibrate")

CALIB_VERSION = 5
LAST_WEIGHT = 0.5  # share of the final observation position (the answer query) in every average
ATTN_NAME = "kvcompile_calibrate"
TOKEN_FIELDS = ("window", "budget", "recent", "decode_window")


# ---- capture through a registered attention function ---------------------------------------------
@dataclasses.dataclass
class _Probe:
    """What the calibration attention function does on this forward (recording / perturbing)."""

    record: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None
    scale: dict[int, float] = dataclasses.field(default_factory=dict)
    outs: dict[int, torch.Tensor] | None = None  # attention outputs kept for the gradient (Fisher) pass


_PROBE: contextvars.ContextVar[_Probe | None] = contextvars.ContextVar("kvcompile_probe", default=None)


def _calibrate_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    probe = _PROBE.get()
    if probe is None:
        return out, weights
    layer, t = module.layer_idx, query.shape[2]
    if probe.record is not None:
        # the cache hands back every key so far; the new tokens are the last t
        probe.record.setdefault(layer, []).append((query, key[:, :, -t:], value[:, :, -t:]))
        probe.scale[layer] = float(kwargs.get("scaling") or query.shape[-1] ** -0.5)
    if probe.outs is not None:
        probe.outs[layer] = out
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _calibrate_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def probing(model: Any, probe: _Probe):
    """Run ``model`` with the calibration attention function and ``probe`` active; restore afterwards."""
    _register()
    previous = model.config._attn_implementation
    token = _PROBE.set(probe)
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield probe
    finally:
        model.set_attn_implementation(previous)
        _PROBE.reset(token)


# ---- damage of one candidate on one layer ------------------------------------------------------
def head_errors(
    strategy: Strategy, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, scale: float,
    ref: torch.Tensor | None = None, absolute: bool = False, memo: dict[Any, Any] | None = None,
) -> torch.Tensor:
    """Relative squared attention-output error per KV head, ``[Hk]`` (module docstring); with
    ``absolute=True`` the squared error per query head and observation position, ``[Hq, t]``. ``memo``:
    a dict shared by the calls of one layer (same q, k, v) to reuse observed attention mass.

    q: [1, Hq, N, D]; k, v: [1, Hk, N, D]; the first ``context_len`` tokens go through the store.
    """
    _, hq, n, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    t = n - context_len
    if ref is None:
        ref = reference_attention(q[:, :, context_len:], k, v, None, scale, causal_new=t)[0]
    store = strategy.new_store(batch=1, num_heads=hk, head_dim=d, gqa=g, dtype=q.dtype, device=q.device)
    c = slice(0, context_len)
    valid_c = torch.ones(1, context_len, dtype=torch.bool, device=q.device)
    if observes(strategy):  # the context's own attention output is not needed, only what the store sees
        # selections (plain, or the prefill selector of a composition) observe a mass that depends only
        # on (observe, obs_window): computed once per layer (``memo``) and handed to the next store of
        # the same kind; a window observer computes only its window's mass (tests/test_calibrate.py)
        sel = store if isinstance(store, SelectStore) else getattr(store, "sel", None)
        sel = sel if isinstance(sel, SelectStore) else None
        key = (sel.s.observe, getattr(sel.s, "obs_window", None)) if sel is not None else None
        if sel is not None and memo is not None and key in memo:
            sel._mass = memo[key]
        elif sel is not None:
            sel.observe_prefill(q[:, :, c], k[:, :, c], v[:, :, c], valid_c, scale)
            if memo is not None:
                memo[key] = sel._mass
        else:
            store.attend(q[:, :, c], k[:, :, c], v[:, :, c], valid_c, scale)
    store.append(k[:, :, c], v[:, :, c], q[:, :, c], valid_c)
    o = slice(context_len, n)
    valid_o = torch.ones(1, t, dtype=torch.bool, device=q.device)
    out = store.attend(q[:, :, o], k[:, :, o], v[:, :, o], valid_o, scale).float()
    rf = ref.float()
    if absolute:
        return (out - rf).pow(2).sum(-1)[0]
    err = (out - rf).pow(2).sum(-1) / rf.pow(2).sum(-1).clamp_min(1e-20)  # [1, Hq, t]
    return position_average(err.view(hk, g, t)).mean(-1)


def position_average(x: torch.Tensor) -> torch.Tensor:
    """Average over the last dim (observation positions) with the final position weighted ``LAST_WEIGHT``:
    on retrieval samples it is the query that produces the answer, which a plain mean dilutes."""
    return (1 - LAST_WEIGHT) * x.mean(-1) + LAST_WEIGHT * x[..., -1]


NON_OBSERVING = ("full", "fp8", "quant", "think")


def observes(strategy: Strategy) -> bool:
    """Whether the store's ``attend`` records anything ``append`` uses (attention mass for scoring).

    Stores of the families in ``NON_OBSERVING`` and selections with ``observe == "none"`` ignore it, so
    calibration skips their context attention (the quadratic part); tests/test_calibrate.py checks the
    errors are identical either way. Unknown strategies are assumed to observe.
    """
    nested = [getattr(strategy, f.name) for f in dataclasses.fields(strategy)]
    nested = [v for v in nested if isinstance(v, Strategy)]
    if nested:
        return any(observes(v) for v in nested) or getattr(strategy, "observe", "none") != "none"
    if strategy.name in NON_OBSERVING:
        return False
    return getattr(strategy, "observe", "all") != "none"


def lossless(strategy: Strategy, model_dtype: torch.dtype) -> bool:
    """True for strategies that store exactly what the model computed (damage 0 by construction)."""
    return isinstance(strategy, Full) and strategy.dtype in ("model", str(model_dtype).removeprefix("torch."))


def rescale(strategy: Strategy, factor: float) -> Strategy:
    """The same strategy with its token-count parameters (``TOKEN_FIELDS``) multiplied by ``factor``."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(strategy):
        val = getattr(strategy, f.name)
        if isinstance(val, Strategy):
            changes[f.name] = rescale(val, factor)
        elif f.name in TOKEN_FIELDS and isinstance(val, int) and not isinstance(val, bool):
            changes[f.name] = max(1, round(val * factor))
    return dataclasses.replace(strategy, **changes) if changes else strategy


def _shape(spec: Any) -> Any:
    if isinstance(spec, dict):
        nested = sorted((k, _shape(v)) for k, v in spec.items() if isinstance(v, dict))
        return (spec.get("name"), tuple(nested))
    return None


def calibration_twins(cands: list[Strategy], context: int, tokens: int) -> list[Strategy]:
    """The candidates as calibrated at ``tokens`` tokens: when a candidate belongs to the planner's or the
    library's default grid at ``context``, its twin at the same index of that grid built for ``tokens``
    (same kept fraction, and identical specs for every context, so the calibration cache is shared);
    otherwise :func:`rescale` by ``tokens / context``."""
    from ..strategies import default_instances
    from .candidates import planner_grid

    twins: dict[str, Strategy] = {}
    for grid in (planner_grid, lambda c: [Full(), *default_instances(c)]):
        try:
            here, there = grid(context), grid(tokens)
        except ValueError:
            continue
        if len(here) == len(there) and all(
            _shape(a.to_spec()) == _shape(b.to_spec()) for a, b in zip(here, there, strict=True)
        ):
            for a, b in zip(here, there, strict=True):
                twins.setdefault(json.dumps(a.to_spec(), sort_keys=True), b)
    return [twins.get(json.dumps(c.to_spec(), sort_keys=True)) or rescale(c, tokens / context) for c in cands]


# ---- one calibration sample -------------------------------------------------------------------
def _run_sample(
    model: Any, sample: CalibrationSample, cands: list[Strategy], bar: Any
) -> tuple[list[list[list[float]]], list[float]]:
    """(damage[l][h][c], sensitivity[l]) on one sample (Fisher-weighted squared error, module docstring)."""
    from transformers import DynamicCache

    from ..strategies.kvzip import KVzip, injected_scores, reconstruction_scores

    ids = torch.tensor([sample.ids], dtype=torch.long)
    ctx_len = sample.context_len
    zips = [c for c in cands if isinstance(c, KVzip)]
    zscores = None
    cache = DynamicCache(config=model.config)
    probe = _Probe(record={})
    with probing(model, probe):
        with torch.no_grad():
            model(ids[:, :ctx_len], **cache_kw(cache), use_cache=True)
            if zips:  # KVzip's reconstruction scores re-read the context on top of this very cache
                zscores = reconstruction_scores(model, ids[:, :ctx_len], chunk=min(c.chunk for c in zips),
                                                cache=cache)
        probe.outs = {}
        with torch.enable_grad():
            logits = model(ids[:, ctx_len:], **cache_kw(cache), use_cache=True).logits[0].float()
            # logits row j predicts token ctx_len + j + 1: each scored span [a, b) (the answers, the prose)
            loss = torch.stack([torch.nn.functional.cross_entropy(
                logits[a - 1 - ctx_len: b - 1 - ctx_len], ids[0, a:b], reduction="sum") for a, b in sample.spans()
            ]).sum()
            layers = sorted(probe.outs)
            grads = torch.autograd.grad(loss, [probe.outs[i] for i in layers])
        g2 = {i: g[0].float().pow(2).sum(-1).transpose(0, 1) for i, g in zip(layers, grads, strict=True)}
        record, probe.record, probe.outs = probe.record or {}, None, None
    dtype = next(model.parameters()).dtype
    damage, sens = [], []
    with torch.no_grad():
        for layer in range(len(record)):
            q, k, v = (torch.cat([r[i] for r in record[layer]], dim=2).float() for i in range(3))
            hq, hk, d = q.shape[1], k.shape[1], q.shape[-1]
            scale = probe.scale[layer]
            t = q.shape[2] - ctx_len
            ref = reference_attention(q[:, :, ctx_len:], k, v, None, scale, causal_new=t)[0]
            w = g2[layer]  # [Hq, t]: ||dLoss/d o||^2 per query head and position
            sens.append(float((w * ref[0].float().pow(2).sum(-1)).sum() / d))
            per_cand = []
            memo: dict[Any, Any] = {}
            for s in cands:
                if lossless(s, dtype):
                    per_cand.append(torch.zeros(hk))
                    continue
                with injected_scores(zscores[layer] if zscores is not None and isinstance(s, KVzip) else None):
                    sq = head_errors(s, q, k, v, ctx_len, scale, ref, absolute=True, memo=memo)  # [Hq, t]
                # E[dNLL] ~ 1/2 * sum_t ||g_t||^2 ||delta_t||^2 / D  (diagonal empirical Fisher)
                per_cand.append((0.5 * w * sq / d).view(hk, hq // hk, t).sum((1, 2)))
            damage.append(torch.stack(per_cand, dim=1).tolist())  # [Hk][C]
            del record[layer]
            if bar is not None:
                bar.update(1)
    return damage, sens


def calibration_key(fingerprint: str, digest: str, specs: list[dict[str, Any]]) -> str:
    body = json.dumps({"v": CALIB_VERSION, "fp": fingerprint, "set": digest, "cands": specs}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:24]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from .._io import write_atomic  # readers see the old entry or the whole new one; stale temps swept

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data))


def run_calibration(
    model: Any, tokenizer: Any, cands: list[Strategy], *, context: int, calibration: str | None = None,
    progress: bool = True, cache: bool = True, workers: int | None = None,
) -> dict[str, Any]:
    """Measure ``err2`` and ``sensitivity`` for ``cands`` (defined at ``context``) on the real model.

    Returns a JSON-able dict: ``err2[l][h][c]``, ``sensitivity[l]``, the rescaled specs, timings and
    ``cache_hit``. Reads/writes ``models.cache_dir()/calibration/<key>.json`` when ``cache``. ``workers``:
    processes the samples are spread over (:mod:`._workers`; None = the usable cores, at most 4).
    """
    from tqdm.auto import tqdm

    from ..models import cache_dir, fingerprint

    cset = load_set(calibration)
    scaled = calibration_twins(cands, context, cset.tokens)
    specs = [s.to_spec() for s in scaled]
    key = calibration_key(fingerprint(model), cset.digest, specs)
    path = cache_dir() / "calibration" / f"{key}.json"
    if cache and path.is_file():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("key") == key:
                data["cache_hit"] = True
                return data
        except (OSError, json.JSONDecodeError):
            log.warning("calibration cache %s unreadable; recomputing", path)
    t0 = time.perf_counter()
    samples = [build_sample(tokenizer, cset, item) for item in cset.samples]
    n_layers = model.config.num_hidden_layers
    bar = tqdm(total=len(samples) * n_layers, desc="calibrate", unit="layer", disable=not progress,
               leave=False)
    try:  # samples are independent: one per worker process (passes/_workers.py), summed in sample order
        results = fork_map(lambda s: _run_sample(model, s, scaled, None), samples,
                           worker_count(workers, len(samples)),
                           on_result=lambda i, r: bar.update(n_layers))
    finally:
        bar.close()
    per_sample = [torch.tensor(e2, dtype=torch.float64) for e2, _ in results]
    n = len(samples)
    data = {
        "key": key,
        "version": CALIB_VERSION,
        "calibration": cset.name,
        "calibration_digest": cset.digest,
        "samples": n,
        "tokens": cset.tokens,
        "specs": specs,
        "damage": robust_damage(per_sample).tolist() if per_sample else [],
        "sensitivity": [sum(col) / n for col in zip(*(sens for _, sens in results), strict=True)],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if cache:
        _write_json(path, data)
    data["cache_hit"] = False
    return data


def robust_damage(per_sample: list[torch.Tensor]) -> torch.Tensor:
    """Mean + standard deviation over the calibration samples of each (layer, head, candidate) damage.

    The solver sums damages over heads, so a plain mean bets on what the few calibration samples
    happened to show. Question-agnostic token selection is the case that matters: whether a head's
    selection keeps the fact a later question asks for varies from sample to sample (large spread),
    while quantization error is similar on every sample (small spread). Charging the spread makes
    the plan robust to the workload it was not calibrated on rather than tuned to the calibration
    facts; with one sample it is the mean.
    """
    x = torch.stack(per_sample)
    return x.mean(0) + (x.std(0, correction=0) if len(per_sample) > 1 else 0.0)


# ---- literature priors (meta models) --------------------------------------------------------------
# Relative damage per strategy family, from the papers' reported quality at the given compression:
# KIVI (2402.02750): 8/4-bit near lossless, 2-bit small loss with a residual window; fp8 KV (vLLM /
# TensorRT-LLM docs) near lossless; token eviction (H2O 2306.14048, SnapKV 2404.14469, StreamingLLM
# 2309.17453) degrades with the evicted fraction, SnapKV < H2O < StreamingLLM on retrieval (SnapKV
# Table 1, RULER); ThinK (2407.21018) ~lossless at 40-50 % channel pruning.
PRIOR_FAMILY = {
    "full": 0.0, "fp8": 0.002, "think": 0.3, "snapkv": 0.4, "heavy_hitter": 0.6, "sink_window": 1.0,
}
PRIOR_QUANT_BITS = {8: 0.001, 4: 0.01, 2: 0.1}


def prior_damage(strategy: Strategy, context: int, head_dim: int = 128) -> float:
    """A literature prior of a strategy's damage at ``context`` tokens (unitless, comparable across heads)."""
    name = strategy.name
    if name == "full":
        return 0.0 if getattr(strategy, "dtype", "model") in ("model", "float32") else 1e-4
    if name == "quant":
        return PRIOR_QUANT_BITS.get(getattr(strategy, "bits", 2), 0.1)
    if name in ("compose", "mikv"):
        parts = [getattr(strategy, f.name) for f in dataclasses.fields(strategy)]
        total = sum(prior_damage(v, context, head_dim) for v in parts if isinstance(v, Strategy))
        return total + (0.05 if name == "mikv" else 0.0)
    if name == "think":
        return PRIOR_FAMILY["think"] * (1 - float(getattr(strategy, "keep_ratio", 1.0))) ** 2
    if hasattr(strategy, "kept"):
        frac = strategy.kept(context) / context
        return PRIOR_FAMILY.get(name, 1.0) * (1 - frac) ** 2
    return PRIOR_FAMILY.get(name, 0.05)


def prior_layer_weights(num_layers: int) -> list[float]:
    """The first two layers attend broadly and are the most sensitive (PyramidKV 2406.02069, SnapKV)."""
    return [3.0 if i < 2 else 1.0 for i in range(num_layers)]


# ---- the pass ------------------------------------------------------------------------------------
@contract(requires=("candidates",), provides=("damage", "notes"))
def calibrate(program: Program, ctx: PassContext) -> Program:
    """Fill ``facts["damage"]``: ``values[l][h][c]`` per candidate of ``facts["candidates"]``.

    Assumes ``assign_candidates`` ran. Real model present: measured (module docstring). Meta model or
    no model: literature priors, with ``source="priors"`` and a note in ``facts["notes"]``.
    """
    cands_fact = program.facts.get("candidates")
    if cands_fact is None:
        return program
    specs = cands_fact["specs"]
    cands = [from_spec(s) for s in specs]
    context = int(cands_fact["context"])
    notes = list(program.facts.get("notes", ()))
    model = ctx.model
    real = model is not None and not program.model.on_meta and ctx.tokenizer is not None
    if not real or ctx.opt("damage") == "priors":
        weights = prior_layer_weights(program.num_layers)
        values = [
            [[weights[s.layer] * prior_damage(c, context, s.head_dim) for c in cands]
             for _ in range(s.num_kv_heads)]
            for s in program.sites
        ]
        why = "damage='priors' was requested" if model is not None and not program.model.on_meta else \
            "the model has no real weights"
        notes.append(f"UNVERIFIED plan: strategies were chosen from literature priors, not measured on this "
                     f"model ({why}); its quality is unknown")
        return program.with_facts(damage=Damage(source="priors", values=values, layer_weight=weights), notes=notes)
    data = run_calibration(
        model, ctx.tokenizer, cands, context=context, calibration=ctx.config.calibration,
        progress=ctx.progress,
        cache=bool(ctx.options.get("calibration_cache", True)), workers=ctx.options.get("workers"),
    )
    sens = data["sensitivity"]
    values = data["damage"]
    bad = [(i, j) for i, layer in enumerate(values) for j, row in enumerate(layer)
           if not all(map(math.isfinite, row))]
    if bad:
        raise ValueError(f"calibration produced non-finite damage at (layer, head) {bad[:4]}")
    log.info("calibration %s: %s", data["key"], "cache hit" if data["cache_hit"] else f"{data['seconds']}s")
    # no timings or cache state in notes: the plan must be byte-identical for the same input
    notes.append(f"damage calibrated on {data['samples']} x {data['tokens']}-token samples of "
                 f"{data['calibration']!r}; units: predicted loss increase on the scored tokens "
                 "(nats, empirical Fisher)")
    damage = Damage(
        source="calibration", values=values, layer_weight=sens, key=data["key"], cache_hit=data["cache_hit"],
        seconds=data["seconds"], calibration=data["calibration"], tokens=data["tokens"], samples=data["samples"],
    )
    return program.with_facts(damage=damage, notes=notes)
