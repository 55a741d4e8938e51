"""Run the solved plan end to end on held-back calibration samples and record what it really does.

``facts["measured"]`` (copied into ``Plan.measured``) gets, on the calibration set's ``heldout`` samples
built at the plan's context (capped at ``options["verify_tokens"]``, default 1024; the first
``options["verify_samples"]`` held-out samples, default 2: one passkey, one prose; a plan for a longer
context is verified with its token budgets rescaled to that length, noted):

* ``kl``: mean KL(full || plan) of the next-token distributions over the prose continuation, whose
  context went through the plan's cache first (question-agnostic);
* ``ppl_full``, ``ppl_plan``, ``ppl_delta`` (= ppl_plan / ppl_full - 1) over the same tokens;
* ``passkey_full``, ``passkey_plan``: greedy pass-key retrieval accuracy, the haystack prefilled into
  the cache before the question is seen.

With ``config.tolerance`` (max allowed ``ppl_delta``; a retrieval drop below the full cache also
fails), a failing plan is re-solved with the damage of its lossy choices multiplied by 4
(``facts["damage_scale"]``) for at most ``options["verify_iterations"]`` (default 3) rounds; the
best measured plan is kept and a failure is stated in ``notes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any

import torch

from ..ir import Program
from ..strategies import from_spec
from . import PassContext
from .calibration import rescale
from .calibration_set import CalibrationSample, build_sample, load_set
from .solve import predict_costs, solve_assignment

TIGHTEN = 4.0
VERIFY_VERSION = 1


def _plan_cache(model: Any, assignment, context: int):
    from ..runtime import make_cache
    from ..runtime.builders import plan_for

    plan = plan_for(model, lambda layer, head: dict(assignment[layer][head]), context)
    return make_cache(plan, model)


@torch.no_grad()
def _passkey(model: Any, tok: Any, s: CalibrationSample, cache: Any) -> bool:
    ids = torch.tensor([s.ids[: s.answer_start]], dtype=torch.long)
    if cache is not None:
        model(ids[:, : s.context_len], past_key_values=cache, use_cache=True)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=8,
                         do_sample=False, pad_token_id=tok.eos_token_id)
    return s.answer in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def _prose_logprobs(model: Any, s: CalibrationSample, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs at the continuation positions [T-1, V] and the scored target ids [T-1]."""
    from transformers import DynamicCache

    ids = torch.tensor([s.ids], dtype=torch.long)
    cache = cache if cache is not None else DynamicCache(config=model.config)
    model(ids[:, : s.context_len], past_key_values=cache, use_cache=True)
    logits = model(ids[:, s.context_len:], past_key_values=cache, use_cache=True).logits[0, :-1].float()
    return torch.log_softmax(logits, -1), ids[0, s.context_len + 1:]


def measure(model: Any, tok: Any, assignment, samples: list[CalibrationSample], context: int,
            progress: bool = False) -> dict[str, Any]:
    """Measured quality of ``assignment`` vs the full cache on ``samples`` (module docstring)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    prev = model.config._attn_implementation
    kls, nll_f, nll_p, pk_f, pk_p = [], [], [], [], []
    try:
        for s in tqdm(samples, desc="verify", disable=not progress, leave=False):
            if s.kind == "passkey":
                pk_f.append(_passkey(model, tok, s, None))
                pk_p.append(_passkey(model, tok, s, _plan_cache(model, assignment, context)))
            else:
                lf, tgt = _prose_logprobs(model, s, None)
                lp, _ = _prose_logprobs(model, s, _plan_cache(model, assignment, context))
                kls.append((lf.exp() * (lf - lp)).sum(-1).mean().item())
                nll_f.append(-lf.gather(-1, tgt[:, None]).mean().item())
                nll_p.append(-lp.gather(-1, tgt[:, None]).mean().item())
    finally:
        model.set_attn_implementation(prev)
    secs = round(time.perf_counter() - t0, 2)
    out: dict[str, Any] = {"samples": len(samples), "tokens": context, "seconds": secs}
    if kls:
        pf, pp = float(torch.tensor(nll_f).mean().exp()), float(torch.tensor(nll_p).mean().exp())
        out.update(kl=sum(kls) / len(kls), ppl_full=pf, ppl_plan=pp, ppl_delta=pp / pf - 1)
    if pk_f:
        out.update(passkey_full=sum(pk_f) / len(pk_f), passkey_plan=sum(pk_p) / len(pk_p),
                   passkey_n=len(pk_f))
    return out


def cached_measure(ctx: PassContext, fingerprint: str, assignment, samples: list[CalibrationSample],
                   tokens: int) -> dict[str, Any]:
    """:func:`measure`, memoised on disk (``models.cache_dir()/verify``) by model fingerprint, the exact
    assignment and sample ids, so recompiling an unchanged plan does not re-run it."""
    from ..models import cache_dir

    plan = [[dict(s) for s in row] for row in assignment]
    body = json.dumps({"v": VERIFY_VERSION, "fp": fingerprint, "a": plan, "s": [list(s.ids) for s in samples],
                       "n": tokens}, sort_keys=True)
    path = cache_dir() / "verify" / f"{hashlib.sha256(body.encode()).hexdigest()[:24]}.json"
    if ctx.options.get("calibration_cache", True) and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    m = measure(ctx.model, ctx.tokenizer, assignment, samples, tokens, ctx.progress)
    if ctx.options.get("calibration_cache", True):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(m, f)
        os.replace(tmp, path)
    return m


def passes_tolerance(m: dict[str, Any], tolerance: float | None) -> bool:
    ok = m.get("passkey_plan", 1.0) >= m.get("passkey_full", 0.0)
    if tolerance is not None and "ppl_delta" in m:
        ok &= m["ppl_delta"] <= tolerance
    return ok


def verify_plan(program: Program, ctx: PassContext) -> Program:
    """Assumes a solved assignment (``facts["solve"]``) and a real model; else returns the program.

    Guarantees ``facts["measured"]`` with the keys in the module docstring plus ``iterations`` and
    ``within_tolerance``; may replace ``assignment`` by a re-solved one (see module docstring).
    """
    if "solve" not in program.facts or ctx.model is None or ctx.tokenizer is None or program.model.on_meta:
        return program
    if not ctx.options.get("verify", True):
        return program
    cset = load_set(ctx.config.calibration)
    context = ctx.config.context
    n = min(context, int(ctx.options.get("verify_tokens", 1024)))
    held = cset.heldout[: int(ctx.options.get("verify_samples", 2))]
    samples = [build_sample(ctx.tokenizer, cset, item, tokens=n) for item in held]
    notes = list(program.facts.get("notes", ()))
    if n < context:
        notes.append(f"verified at {n} tokens (plan context {context}): token budgets rescaled by "
                     f"{n / context:.3g}")

    def run(p: Program) -> dict[str, Any]:
        assignment: Any = p.assignment
        if n < context:
            assignment = [[rescale(from_spec(s), n / context).to_spec() for s in row] for row in assignment]
        return cached_measure(ctx, program.model.fingerprint, assignment, samples, n)

    tol = ctx.config.tolerance
    best, best_m = program, run(program)
    history = [best_m]
    rounds = int(ctx.options.get("verify_iterations", 3)) if tol is not None else 0
    current = program
    for _ in range(rounds):
        if passes_tolerance(best_m, tol):
            break
        specs = current.facts["candidates"]["specs"]
        scale = [list(map(list, layer)) for layer in current.facts.get("damage_scale") or
                 [[[1.0] * len(specs) for _ in range(s.num_kv_heads)] for s in current.sites]]
        for li, row in enumerate(current.assignment or ()):
            for h, spec in enumerate(row):
                i = specs.index(dict(spec))
                if current.facts["damage"]["values"][li][h][i] > 0:
                    scale[li][h][i] *= TIGHTEN
        current = predict_costs(solve_assignment(current.with_facts(damage_scale=scale), ctx), ctx)
        m = run(current)
        history.append(m)
        rank = (passes_tolerance(m, tol), -m.get("kl", 0.0))
        if rank > (passes_tolerance(best_m, tol), -best_m.get("kl", 0.0)):
            best, best_m = current, m
    ok = passes_tolerance(best_m, tol)
    if tol is not None and not ok:
        notes.append(f"verification FAILED tolerance {tol}: best ppl_delta={best_m.get('ppl_delta')}, "
                     f"passkey {best_m.get('passkey_plan')} vs full {best_m.get('passkey_full')} "
                     f"after {len(history)} solve(s)")
    measured = {**best_m, "iterations": len(history), "within_tolerance": ok if tol is not None else None,
                "tolerance": tol, "history": history if len(history) > 1 else None,
                "source": "heldout calibration samples (question-agnostic)"}
    return best.with_facts(measured=measured, notes=notes)
