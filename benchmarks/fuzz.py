"""Seeded mutation fuzzer over real plan files: ``kvcompile.load`` must be a safe boundary.

Base plans (built once, cheaply): SmolLM2-135M at 25 % of the bf16 KV cache (real weights, damage from
priors, no verification pass) and Llama-3-70B on 8 x H100 from its config on the meta device (with a
placement). Each variant is one mutation of a base file:

* ``bitflip`` — 1-8 random bits flipped; ``truncate`` — cut at a random byte; ``insert`` — 1-16
  random bytes inserted (often invalid UTF-8);
* ``json`` — a structural JSON edit at a random path (replace a value by another type / NaN /
  Infinity / a huge or negative number / a deep nest, delete or add a key, drop / duplicate a list
  item, edit a string, inject a kernel source that writes a marker file), content hash left as is;
* ``json_rehash`` — the same edits with the content hash recomputed the way anyone can (SHA-256 of
  the canonical JSON), so only the semantic checks stand between the edit and the runtime; 30 % of
  them are *semantic* edits (one head's strategy, the model's fingerprint / dtype / meta flag, the
  context) with every derived field recomputed as an honest recompile would (:func:`semantic_edit`).

Every variant runs ``load`` -> ``render_inspect`` -> (if it loads) an independent consistency oracle
-> ``make_cache`` on a model of the plan's geometry (the real SmolLM2, or the 70B meta model) and, for
SmolLM2, one prefill + one decode step whose cache bytes must equal ``predicted_kv_bytes``. Outcomes:
``plan_error`` (clean PlanError on load), ``rejected_at_make_cache`` (loads, then make_cache refuses
with a PlanError, e.g. a fingerprint edit), ``accepted_consistent``, ``accepted_inconsistent`` (the
oracle disagrees: a bug), ``bug`` (any other exception, anywhere), ``hang`` (over the per-variant
time limit). The marker file an injected kernel source would write must never appear.

"Consistent" means: every field derivable from (sites, layers, config, target) equals its derivation
— strategy specs valid for the site, exact byte predictions, target-derived capacities, schedule
and kernel records (key, source, sha256) equal to this kvcompile's lowering, placement rows covering
each layer's heads with their own strategy — and the runtime holds exactly the predicted bytes.
Opinion fields (measured quality, latency predictions, notes, the model's display name) are data: an
edit of them is a different, still consistent plan.

Run: ``python benchmarks/fuzz.py --n 2400 --seed 0`` -> ``benchmarks/results/fuzz.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS = ("bitflip", "truncate", "insert", "json", "json_rehash")
OUTCOMES = ("plan_error", "rejected_at_make_cache", "accepted_consistent", "accepted_inconsistent", "bug", "hang")
MARKER_ENV = "KVCOMPILE_FUZZ_MARKER"


# ---- base plans ------------------------------------------------------------------------------------
def build_smol_plan(model_loaded: Any) -> Any:
    """SmolLM2 at 25 % of bf16 KV bytes, context 1024, damage from priors, no verification pass (~8 s)."""
    import kvcompile

    return kvcompile.optimize(
        model_loaded, target="h100", context=1024, kv_budget=0.25, damage="priors", verify=False, progress=False
    )


def build_70b_plan() -> tuple[Any, Any]:
    """Llama-3-70B on 8 x H100 from its config on the meta device (with a placement), and the meta model."""
    import kvcompile
    from kvcompile.models import load

    loaded = load("llama-3-70b")
    return kvcompile.optimize(loaded, target="h100-sxm:8", progress=False), loaded.model


# ---- mutations -------------------------------------------------------------------------------------
def rehash(raw: dict[str, Any]) -> str:
    """The content hash as anyone can recompute it: kvcompile's own ``Plan.compute_hash`` when the
    edited dict still validates as a Plan, else SHA-256 of its canonical JSON without the hash."""
    from pydantic import ValidationError

    from kvcompile.plan import Plan

    try:
        return Plan.model_validate(raw, strict=True).compute_hash()
    except (ValidationError, ValueError, TypeError):
        body = {k: v for k, v in raw.items() if k != "content_hash"}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _get(root: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        root = root[p]
    return root


def _evil_source(marker: str) -> str:
    return f"import pathlib\npathlib.Path({marker!r}).write_text('pwned')\nURI = 'x'\nENTRY = 'x'\n"


def _nest(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


def _random_value(rng: random.Random, old: Any, marker: str) -> Any:
    choices: list[Any] = [
        None, True, False, 0, -1, 1, 2**31, 2**63 + 5, -(2**40), 10**30, 0.5, -0.0, 1e308, 3.5e-320,
        float("nan"), float("inf"), float("-inf"), "", "x", "../../etc/passwd", "\u00e9",
        [], {}, [1, 2, 3], {"name": "full"}, {"name": "quant", "bits": 3}, {"name": "nope"}, "NaN",
        _evil_source(marker), "0" * 64, "a" * 5000, _nest(30),
    ]  # fmt: skip
    if isinstance(old, bool):
        choices += [not old]
    elif isinstance(old, int):
        choices += [old + 1, old - 1, -old, old * 2, old // 2, old * 10**6, 0]
    elif isinstance(old, float):
        choices += [old * 1.0000001, -old, old * 2, 0.0, old + 1]
    elif isinstance(old, str):
        choices += [old + "x", old[:-1], old.upper(), old.replace("a", "b"), old * 2]
    return copy.deepcopy(rng.choice(choices))


def mutate_json(rng: random.Random, raw: dict[str, Any], marker: str) -> dict[str, Any]:
    """One structural edit at a random path (top-level key first, then uniform below it)."""
    raw = copy.deepcopy(raw)
    top = rng.choice(sorted(raw))
    if top == "kernels" and isinstance(raw.get("kernels"), dict) and raw["kernels"] and rng.random() < 0.5:
        uri = rng.choice(sorted(raw["kernels"]))  # the code-execution attack: a kernel source that writes
        rec = raw["kernels"][uri]
        op = rng.choice(["evil", "evil_null_sha", "evil_sha", "extra_kernel"])
        evil = _evil_source(marker) + (rec.get("source") or "")
        if op == "extra_kernel":
            raw["kernels"]["decode_full_hd64_gqa3_f32"] = {"source": evil, "sha256": None, "key": rec.get("key")}
        else:
            rec["source"] = evil
            rec["sha256"] = None if op == "evil_null_sha" else hashlib.sha256(evil.encode()).hexdigest()
        return raw
    paths = [(top, *p) for p in _paths(raw[top])]
    path = rng.choice(paths)
    parent = _get(raw, path[:-1])
    key = path[-1]
    op = rng.choice(["replace", "replace", "replace", "delete", "add", "dup", "nest"])
    target = parent[key]
    if op == "delete":
        del parent[key]
    elif op == "add" and isinstance(target, dict):
        target[rng.choice(["extra", "name", "bits", "__class__", "layer"])] = _random_value(rng, None, marker)
    elif op == "dup" and isinstance(target, list) and target:
        i = rng.randrange(len(target))
        target.insert(i, copy.deepcopy(target[i]) if rng.random() < 0.7 else _random_value(rng, target[i], marker))
    elif op == "nest":
        parent[key] = [target] if rng.random() < 0.5 else {"value": target}
    else:
        parent[key] = _random_value(rng, target, marker)
    return raw


def rederive(plan: Any) -> Any:
    """What an honest recompile would write after an edit of the layers / model / config: the exact
    ``predicted`` byte values, and the schedule and kernel records when the plan carries them."""
    from kvcompile.codegen.lower import with_codegen

    cfg, t, pr = plan.config, plan.target, dict(plan.predicted)
    kv = plan.predicted_kv_bytes(cfg.context, cfg.batch)
    full_bf16 = plan.full_kv_bytes(cfg.context, cfg.batch, dtype="bfloat16")
    exact = {
        "kv_bytes_at_context": kv, "kv_bytes_per_seq": plan.predicted_kv_bytes(cfg.context, 1),
        "kv_bytes_total": kv, "kv_bytes": plan.predicted_kv_bytes(cfg.context, 1),
        "full_kv_bytes": plan.full_kv_bytes(cfg.context, 1),
        "full_kv_bytes_at_context": plan.full_kv_bytes(cfg.context, cfg.batch),
        "full_bf16_kv_bytes_at_context": full_bf16, "full_kv_bytes_per_token": plan.full_kv_bytes(1, 1),
        "full_bf16_kv_bytes_per_token": plan.full_kv_bytes(1, 1, dtype="bfloat16"),
        "kv_bytes_per_token": kv / (cfg.context * cfg.batch), "kv_ratio_vs_full_bf16": kv / full_bf16,
        "memory_capacity_bytes": t.memory_bytes * t.gpus, "context": cfg.context, "batch": cfg.batch,
    }  # fmt: skip
    pr.update({k: v for k, v in exact.items() if k in pr})
    plan = plan.model_copy(update={"predicted": pr})
    if plan.schedule is not None or plan.kernels is not None:
        plan = with_codegen(plan)
    return plan.sealed()


def semantic_edit(rng: random.Random, raw: dict[str, Any]) -> dict[str, Any]:
    """A meaningful edit made the way a careful attacker (or another tool) would: one head's strategy,
    the model's fingerprint / dtype / meta flag, or the context, with every derived field recomputed."""
    from kvcompile.plan import LayerPlan, Plan
    from kvcompile.strategies import default_instances

    plan = Plan.model_validate(raw)
    op = rng.choice(["spec", "spec", "spec", "spec", "fingerprint", "on_meta", "dtype", "context"])
    if op == "spec":
        layer = rng.randrange(len(plan.layers))
        heads = [dict(h) for h in plan.layers[layer].heads]
        heads[rng.randrange(len(heads))] = rng.choice(default_instances(plan.config.context)).to_spec()
        layers = list(plan.layers)
        layers[layer] = LayerPlan(layer=layer, heads=heads)
        plan = plan.model_copy(update={"layers": layers})
    elif op in ("fingerprint", "on_meta", "dtype"):
        change = {
            "fingerprint": {"fingerprint": f"{rng.getrandbits(80):020x}"},
            "on_meta": {"on_meta": not plan.model.on_meta},
            "dtype": {"dtype": rng.choice([d for d in ("float32", "bfloat16", "float16") if d != plan.model.dtype])},
        }[op]
        plan = plan.model_copy(update={"model": plan.model.model_copy(update=change)})
    else:
        context = rng.choice([plan.config.context * 2, plan.config.context // 2 + 1])
        plan = plan.model_copy(update={"config": plan.config.model_copy(update={"context": context})})
    try:
        return json.loads(rederive(plan).to_json())
    except ValueError:  # e.g. a strategy that does not fit the new context: leave the bare edit
        return json.loads(plan.model_copy(update={"content_hash": ""}).model_dump_json())


def mutate(rng: random.Random, kind: str, text: str, raw: dict[str, Any], marker: str) -> bytes:
    data = text.encode()
    if kind == "bitflip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "insert":
        i = rng.randrange(len(data) + 1)
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[i:]
    if kind == "json_rehash" and rng.random() < 0.3:
        return json.dumps(semantic_edit(rng, raw)).encode()
    edited = mutate_json(rng, raw, marker)
    if kind == "json_rehash":
        with contextlib.suppress(TypeError, ValueError):  # non-string keys have no canonical form
            edited["content_hash"] = rehash(edited)
    indent = 1 if rng.random() < 0.5 else None
    return json.dumps(edited, indent=indent, sort_keys=rng.random() < 0.8).encode()


# ---- the oracle ------------------------------------------------------------------------------------
class Inconsistent(AssertionError):
    """The oracle found a field that does not match its derivation in an accepted plan."""


def check_consistent(plan: Any) -> None:
    """Independent re-derivation of every derived field of an accepted plan (see module docstring)."""
    from kvcompile.codegen.cache import render, sha256
    from kvcompile.codegen.keys import KernelKey
    from kvcompile.codegen.lower import lower
    from kvcompile.ir import dtype_bytes
    from kvcompile.strategies import from_spec

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise Inconsistent(what)

    m, cfg, t = plan.model, plan.config, plan.target
    need(plan.compute_hash() == plan.content_hash, "hash")
    need(len(plan.layers) == len(m.sites) > 0, "layer count")
    db = dtype_bytes(m.dtype)
    kv = 0
    for i, (site, lp) in enumerate(zip(m.sites, plan.layers, strict=True)):
        need(site.layer == i == lp.layer, f"layer order {i}")
        need(site.num_q_heads % site.num_kv_heads == 0 and len(lp.heads) == site.num_kv_heads, f"heads {i}")
        for spec in lp.heads:
            s = from_spec(spec)
            s.validate_for(head_dim=site.head_dim, context=cfg.context)
            kv += s.bytes_for_seq(cfg.context, 0, site.head_dim, db)
    full = sum(s.num_kv_heads * (s.head_dim + s.v_head_dim) for s in m.sites)
    pr = plan.predicted
    exact = {
        "kv_bytes_at_context": kv * cfg.batch, "kv_bytes_per_seq": kv, "kv_bytes_total": kv * cfg.batch,
        "kv_bytes": kv, "full_kv_bytes": full * db * cfg.context,
        "full_kv_bytes_at_context": full * db * cfg.context * cfg.batch,
        "full_bf16_kv_bytes_at_context": full * 2 * cfg.context * cfg.batch,
        "full_kv_bytes_per_token": full * db, "full_bf16_kv_bytes_per_token": full * 2,
        "memory_capacity_bytes": t.memory_bytes * t.gpus, "context": cfg.context, "batch": cfg.batch,
    }  # fmt: skip
    for k, v in exact.items():
        need(k not in pr or pr[k] == v, f"predicted.{k}")
    if "kv_bytes_per_token" in pr:
        need(math.isclose(pr["kv_bytes_per_token"], kv * cfg.batch / (cfg.context * cfg.batch)), "per token")
    if "target" in pr:
        need(pr["target"] in (t.name, f"{t.name}:{t.gpus}"), "predicted.target")
    if plan.schedule is not None or plan.kernels is not None:
        sched = lower(plan)
        need(plan.schedule is None or plan.schedule == sched.to_json(), "schedule")
        if plan.kernels is not None:
            need(set(plan.kernels) == set(sched.kernels), "kernel set")
            for uri, rec in plan.kernels.items():
                src = render(KernelKey.from_json(dict(sched.kernels[uri])))
                need(rec.get("key") == sched.kernels[uri], f"kernel key {uri}")
                need(rec.get("source") in (None, src), f"kernel source {uri}")
                need(rec.get("sha256") in (None, sha256(src)), f"kernel sha {uri}")
    pl = plan.placement
    if pl and "tp" in pl:
        need(pl["gpus"] == t.gpus and pl["context"] == cfg.context, "placement node")
        need(pl["per_gpu"]["capacity"] == t.memory_bytes, "placement capacity")
        need(pl.get("target") in (t.name, f"{t.name}:{t.gpus}"), "placement target")
        need(len(pl["placement"]) == len(m.sites), "placement rows")
        for i, row in enumerate(pl["placement"]):
            heads = sorted(h for g in row["groups"] for h in g["heads"])
            need(row["layer"] == i and heads == list(range(m.sites[i].num_kv_heads)), f"placement row {i}")
            for g in row["groups"]:
                need(all(json.loads(g["group"]) == plan.layers[i].heads[h] for h in g["heads"]), "group spec")


def run_runtime(plan: Any, model: Any, real: bool) -> None:
    """make_cache on ``model``; with real weights also a 8-token prefill and one decode step whose
    cache bytes must equal the plan's prediction. PlanError propagates (a clean refusal)."""
    import torch

    from kvcompile._compat import cache_kw
    from kvcompile.runtime import make_cache

    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), _quiet_warnings():
        cache = make_cache(plan, model)
        if not real:
            return
        ids = torch.arange(1, 9)[None]
        with torch.no_grad():
            out = model(ids, **cache_kw(cache))
            if cache.nbytes() != plan.predicted_kv_bytes(8):
                raise Inconsistent(f"prefill holds {cache.nbytes()} B, plan predicts {plan.predicted_kv_bytes(8)}")
            nxt = out.logits[:, -1:].argmax(-1)
            model(nxt, **cache_kw(cache))
            if cache.nbytes() != plan.predicted_kv_bytes(8, decoded=1):
                raise Inconsistent("decode step holds other bytes than predicted")


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _Hang(Exception):
    pass


def _alarm(_sig: int, _frame: Any) -> None:
    raise _Hang()


def _runtime_key(plan: Any) -> str:
    """Two accepted plans with equal runtime-relevant fields behave identically at make_cache/decode."""
    body = plan.model_dump(mode="json", include={"model", "layers", "config", "schedule", "kernels"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def run_variant(data: bytes, model: Any, real: bool, workdir: Path, seen: dict[str, str],
                time_limit_s: float = 20.0) -> tuple[str, str]:  # fmt: skip
    """(outcome, detail) of one variant file (see module docstring)."""
    from kvcompile import load
    from kvcompile.plan import PlanError
    from kvcompile.report import render_inspect

    path = workdir / "variant.kvplan"
    path.write_bytes(data)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit_s)
    try:
        try:
            plan = load(path)
        except PlanError as e:
            return "plan_error", str(e).split(": ", 1)[-1][:60]
        render_inspect(plan)
        render_inspect(plan, context=plan.config.context * 2 + 1, batch=3)
        check_consistent(plan)
        key = _runtime_key(plan)
        if key not in seen:
            try:
                run_runtime(plan, model, real)
                seen[key] = "accepted_consistent"
            except PlanError as e:
                seen[key] = "rejected_at_make_cache: " + str(e)[:60]
        outcome = seen[key]
        return (outcome.split(":")[0], outcome) if outcome != "accepted_consistent" else (outcome, "")
    except _Hang:
        return "hang", ""
    except Inconsistent as e:
        return "accepted_inconsistent", str(e)[:200]
    except Exception as e:  # noqa: BLE001 - every other exception is a bug the fuzzer reports
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "bug", f"{type(e).__name__}: {str(e)[:120]} at {Path(tb.filename).name}:{tb.lineno}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fuzz(bases: dict[str, str], models: dict[str, tuple[Any, bool]], n: int, seed: int,
         log: Any = None) -> dict[str, Any]:  # fmt: skip
    """``n`` variants (round-robin over bases and mutation kinds); the summary dict of fuzz.json."""
    rng = random.Random(seed)
    raws = {name: json.loads(text) for name, text in bases.items()}
    counts: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    by_base: dict[str, Counter[str]] = {b: Counter() for b in bases}
    examples: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        marker = str(work / "MARKER_kernel_source_ran")
        os.environ[MARKER_ENV] = marker
        for i in range(n):
            base = sorted(bases)[i % len(bases)]
            kind = KINDS[(i // len(bases)) % len(KINDS)]
            data = mutate(rng, kind, bases[base], raws[base], marker)
            outcome, detail = run_variant(data, *models[base], work, seen)
            if Path(marker).exists():
                outcome, detail = "bug", "injected kernel source ran (marker file written)"
                Path(marker).unlink()
            counts[kind][outcome] += 1
            by_base[base][outcome] += 1
            if outcome not in ("plan_error", "accepted_consistent", "rejected_at_make_cache"):
                examples.setdefault(outcome, []).append(f"{base}/{kind}: {detail}")
                if log:
                    print(f"[{i}] {base}/{kind}: {outcome}: {detail}", file=log, flush=True)
    wall = time.perf_counter() - t0
    total = Counter()
    for c in counts.values():
        total.update(c)
    return {
        "seed": seed,
        "n": n,
        "wall_s": round(wall, 1),
        "bases": {b: len(bases[b]) for b in bases},
        "outcomes": {o: total.get(o, 0) for o in OUTCOMES},
        "by_kind": {k: {o: c.get(o, 0) for o in OUTCOMES} for k, c in counts.items()},
        "by_base": {b: {o: c.get(o, 0) for o in OUTCOMES} for b, c in by_base.items()},
        "distinct_runtime_plans_run": len(seen),
        "examples": {k: v[:20] for k, v in examples.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fuzz.json"))
    args = ap.parse_args(argv)
    import torch

    from kvcompile.models import load

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    smol = load("smollm2-135m")
    plan_s = build_smol_plan(smol)
    plan_70, meta70 = build_70b_plan()
    build_s = time.perf_counter() - t0
    bases = {"smollm2-25pct": plan_s.to_json(), "llama-3-70b-8xh100": plan_70.to_json()}
    models = {"smollm2-25pct": (smol.model, True), "llama-3-70b-8xh100": (meta70, False)}
    summary = fuzz(bases, models, args.n, args.seed, log=sys.stderr)
    summary["base_build_s"] = round(build_s, 1)
    summary["command"] = f"python benchmarks/fuzz.py --n {args.n} --seed {args.seed}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("n", "wall_s", "outcomes")}))
    return 0 if all(summary["outcomes"][o] == 0 for o in ("accepted_inconsistent", "bug", "hang")) else 1


if __name__ == "__main__":
    sys.exit(main())
