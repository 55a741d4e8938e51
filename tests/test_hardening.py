"""A plan file from anyone is safe to load: strict parsing, cross-field invariants, no code from a plan,
provenance checks in make_cache, strategy spec validation. (CLI / model / target inputs:
tests/test_hardening_inputs.py; fuzzing: tests/test_fuzz.py; docs/bad_inputs.md lists every row.)"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import transformers as T

from kvcompile import load
from kvcompile._compat import cache_kw
from kvcompile.codegen.lower import with_codegen
from kvcompile.plan import MAX_LAYERS, Plan, PlanError
from kvcompile.runtime import make_cache
from kvcompile.runtime.builders import mixed_plan
from kvcompile.strategies import from_spec

Q4 = {"name": "quant", "bits": 4, "group": 8, "residual": 8}


@pytest.fixture(scope="module")
def tiny():
    cfg = T.LlamaConfig(
        hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, vocab_size=64, head_dim=16,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def plan(tiny):
    """A real-weights plan with a schedule and kernel records (quant + full + sink window heads)."""
    window = {"name": "sink_window", "sinks": 2, "window": 30}
    return with_codegen(mixed_plan(tiny, [Q4, "full", window], context=128))


@pytest.fixture(scope="module")
def plan70b():
    import kvcompile

    return kvcompile.optimize("llama-3-70b", target="h100-sxm:8", progress=False)


def reseal(raw: dict) -> dict:
    """Recompute the content hash the way anyone can (so only the semantic checks refuse an edit)."""
    raw = dict(raw)
    try:
        raw["content_hash"] = Plan.model_validate(raw, strict=True).compute_hash()
    except Exception:
        body = json.dumps({k: v for k, v in raw.items() if k != "content_hash"}, sort_keys=True, separators=(",", ":"))
        raw["content_hash"] = hashlib.sha256(body.encode()).hexdigest()
    return raw


def _write(tmp_path, raw, name="p.kvplan"):
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return path


def _edit(plan, fn, rehash=True):
    raw = json.loads(plan.to_json())
    fn(raw)
    return reseal(raw) if rehash else raw


def test_round_trip_is_exact(plan, tmp_path):
    back = load(plan.save(tmp_path / "p.kvplan"))
    assert back == plan and back.schedule and back.kernels


# ---- bytes and JSON -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"schema_version": 1, "x": "\xff\xfe"}', "not UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "nested deeper"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested deeper"),
        (b'{"schema_version": 1, "n": NaN}', "NaN is not allowed"),
        (b'{"schema_version": 1, "n": -Infinity}', "Infinity is not allowed"),
        (b'{"schema_version": 1, "n": 1e999}', "overflows"),
        (b'{"schema_version": 1, "n": ' + b"9" * 5000 + b"}", "out of range"),
        (b'{"schema_version": 1, "schema_version": 1}', "duplicate key"),
    ],
    ids=["non-utf8", "deep-list", "deep-object", "nan", "infinity", "float-overflow", "huge-int", "duplicate-key"],
)
def test_bad_bytes_are_plan_errors(tmp_path, data, reason):
    path = tmp_path / "p.kvplan"
    path.write_bytes(data)
    with pytest.raises(PlanError, match=reason) as e:
        load(path)
    assert "\n" not in str(e.value)


def test_huge_file_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr("kvcompile.plan.MAX_PLAN_BYTES", 1000)
    path = tmp_path / "p.kvplan"
    path.write_bytes(b" " * 1001)
    with pytest.raises(PlanError, match="larger than 1000 bytes"):
        load(path)


def test_nan_hash_is_not_ambiguous(plan, tmp_path):
    """pydantic dumps NaN as null: a NaN edit must not load with the hash of the null version."""
    raw = json.loads(plan.to_json())
    raw["measured"] = {"kl": None}
    raw = reseal(raw)
    text = json.dumps(raw).replace('"kl": null', '"kl": NaN')
    path = tmp_path / "p.kvplan"
    path.write_text(text)
    with pytest.raises(PlanError, match="NaN"):
        load(path)
    with pytest.raises(ValueError):  # and a plan cannot even be built with one
        plan.model_copy(update={"measured": {"kl": float("nan")}}).compute_hash()


# ---- strict fields and cross-field invariants (hash recomputed: only the checks stand in the way) -----
def _set(path, value):
    def fn(raw):
        node = raw
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    return fn


EDITS = [
    (_set(["config", "context"], -5), "config.context"),
    (_set(["config", "context"], 10**12), "config.context"),
    (_set(["config", "batch"], True), "config.batch"),
    (_set(["config", "objective"], "nonsense"), "objective"),
    (_set(["target", "memory_bandwidth"], 0), "memory_bandwidth"),
    (_set(["target", "name"], "../../etc/x"), "target.name"),
    (_set(["model", "sites", 0, "num_kv_heads"], 0), "num_kv_heads"),
    (_set(["model", "sites", 0, "head_dim"], "64"), "head_dim"),
    (_set(["model", "dtype"], "int7"), "dtype"),
    (_set(["model", "sites", 1, "layer"], 0), "layers and sites must be listed in order"),
    (_set(["model", "sites", 0, "num_kv_heads"], 2), "3 strategies for 2 KV heads"),
    (_set(["model", "sites", 0, "num_q_heads"], 7), "query heads is not a multiple"),
    (lambda r: r["layers"].pop(), "1 layers but 2 model sites"),
    (lambda r: r["layers"][0]["heads"].append({"name": "full"}), "4 strategies for 3 KV heads"),
    (_set(["layers", 0, "heads", 0, "bits"], "4"), "bits='4' must be int"),
    (_set(["layers", 0, "heads", 0, "bits"], 3), "bits=3 not allowed"),
    (_set(["layers", 0, "heads", 0, "group"], 0), "group=0 must be >= 1"),
    (_set(["layers", 0, "heads", 0, "exec"], 1), "unknown parameter 'exec'"),
    (_set(["layers", 0, "heads", 2, "window"], 500), "larger than context"),
    (_set(["predicted", "kv_bytes"], 1), "predicted.kv_bytes"),
    (_set(["schedule", 3, "group"], 1), "schedule instruction 3"),
    (lambda r: r["schedule"].pop(), "schedule has"),
    (lambda r: next(iter(r["kernels"].values())).update(sha256=None, source="import os\n"), "embedded source"),
    (lambda r: next(iter(r["kernels"].values())).update(sha256="0" * 64, source=None), "recorded sha256"),
    (lambda r: next(iter(r["kernels"].values()))["key"].update(head_dim=32), "key is not the one"),
    (lambda r: r["kernels"].update(x={"key": {}}), "'x' is not used by the schedule"),
    (lambda r: r["kernels"].pop(sorted(r["kernels"])[0]), "is missing"),
    (lambda r: r["layers"].extend([r["layers"][0]] * (MAX_LAYERS + 1)), "layers"),
    (_set(["notes"], ["x" * (1 << 17)]), "notes"),
]


@pytest.mark.parametrize(("edit", "reason"), EDITS, ids=[f"{i}-{r[:24]}" for i, (_, r) in enumerate(EDITS)])
def test_rehashed_edits_are_plan_errors(plan, tmp_path, edit, reason):
    path = _write(tmp_path, _edit(plan, edit))
    with pytest.raises(PlanError, match=reason) as e:
        load(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600


PLACEMENT_EDITS = [
    (lambda p: p.update(gpus=4), "made for 4 GPUs"),
    (lambda p: p.update(tp=3), "TP=3"),
    (lambda p: p["placement"].pop(), "layer rows"),
    (lambda p: p["placement"][5]["groups"][0]["heads"].pop(), "does not cover"),
    (lambda p: p["placement"][5]["groups"][0].update(group='{"name": "fp8"}'), "not the strategy of its heads"),
    (lambda p: p.update(per_gpu={}), "per_gpu"),
    (lambda p: p.update(rank_heads=[[99]] * p["tp"]), "rank_heads"),
    (lambda p: p.update(target="a100-80gb:8"), "made for target"),
]


@pytest.mark.parametrize(("edit", "reason"), PLACEMENT_EDITS, ids=[r for _, r in PLACEMENT_EDITS])
def test_rehashed_placement_edits_are_plan_errors(plan70b, tmp_path, edit, reason):
    path = _write(tmp_path, _edit(plan70b, lambda r: edit(r["placement"])))
    with pytest.raises(PlanError, match=reason):
        load(path)


def test_70b_plan_loads_and_its_predictions_are_checked(plan70b, tmp_path):
    assert load(plan70b.save(tmp_path / "a.kvplan")) == plan70b
    bad = _edit(plan70b, _set(["predicted", "memory_capacity_bytes"], 1))
    with pytest.raises(PlanError, match="memory_capacity_bytes"):
        load(_write(tmp_path, bad))


def test_opinion_fields_are_data(plan, tmp_path):
    """Edits of fields nothing derives (notes, measured quality) give another valid plan."""
    raw = _edit(plan, lambda r: r.update(notes=["edited"], measured={"kl": 0.5}))
    assert load(_write(tmp_path, raw)).notes == ["edited"]


# ---- strategy specs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"name": "quant", "bits": True}, "must be int"),
        ({"name": "quant", "bits": 4.0}, "must be int"),
        ({"name": "think", "keep_ratio": float("nan")}, "finite"),
        ({"name": "fp8", "headroom": "big"}, "must be float"),
        ({"name": "compose", "select": {"name": "quant"}}, "not a Selection"),
        ({"name": "compose", "select": [1]}, "must be Selection"),
        ({"name": "mikv", "select": {"name": "mikv", "select": {"name": "mikv"}}}, "not a Selection"),
        ({"name": ["full"]}, "unknown strategy"),
        ({"name": "full", "dtype": None}, "must be str"),
        ("full", "must be a mapping"),
    ],
)
def test_from_spec_rejects_ill_typed_specs(spec, reason):
    with pytest.raises(ValueError, match=reason):
        from_spec(spec)


def test_from_spec_depth_is_bounded():
    spec: dict = {"name": "sink_window"}
    for _ in range(10):
        spec = {"name": "compose", "select": spec}
    with pytest.raises(ValueError, match="nested deeper"):
        from_spec(spec)


def test_from_spec_turns_odd_check_failures_into_value_errors(monkeypatch):
    from kvcompile.strategies.think import ThinK

    monkeypatch.setattr(ThinK, "check", lambda self: 1 / 0)
    with pytest.raises(ValueError, match="ZeroDivisionError"):
        from_spec({"name": "think"})


# ---- no code from a plan -------------------------------------------------------------------------
def _evil_plan(plan, marker, *, null_sha=False, extra=False):
    raw = json.loads(plan.to_json())
    uri = next(u for u in raw["kernels"] if u.startswith("decode"))
    evil = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('pwned')\n" + raw["kernels"][uri]["source"]
    rec = {"source": evil, "sha256": None if null_sha else hashlib.sha256(evil.encode()).hexdigest()}
    if extra:  # a record the schedule never uses
        raw["kernels"]["decode_full_hd16_gqa2_f32"] = {**rec, "key": raw["kernels"][uri]["key"]}
    else:
        raw["kernels"][uri].update(rec)
    return reseal(raw), uri


@pytest.mark.parametrize("variant", ["hashed", "null-sha", "extra-record"])
@pytest.mark.parametrize("backend", ["torch", "triton-interpret", "triton"])
def test_plan_kernel_source_never_runs(plan, tiny, tmp_path, monkeypatch, backend, variant):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from kvcompile.cli import main
    from kvcompile.codegen.cache import clear_memory_cache

    monkeypatch.setenv("KVCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    marker = tmp_path / "MARKER"
    raw, uri = _evil_plan(plan, marker, null_sha=variant == "null-sha", extra=variant == "extra-record")
    path = _write(tmp_path, raw)
    with pytest.raises(PlanError, match=uri if variant != "extra-record" else "not used by the schedule"):
        load(path)
    assert main(["inspect", str(path)]) == 2
    # bypass load: the same dict validated in memory reaches make_cache / generate directly
    evil = Plan.model_validate(raw)
    model = copy.deepcopy(tiny)
    try:
        cache = make_cache(evil, model, backend=backend)
    except PlanError as e:
        assert "kernel" in str(e)
    else:  # the extra record is never imported: kernels come from their keys
        ids = torch.arange(1, 20)[None]
        with torch.no_grad():
            model.generate(ids, max_new_tokens=3, do_sample=False, **cache_kw(cache))
    assert not marker.exists()
    assert not any("pwned" in p.read_text() for p in (tmp_path / "cache").rglob("*.py"))


def test_legit_plan_runs_on_every_cpu_backend(plan, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load(plan.save(tmp_path / "p.kvplan"))
    ids = torch.arange(1, 20)[None]
    outs = []
    for backend in ("torch", "triton-interpret"):
        model = copy.deepcopy(tiny)
        cache = make_cache(loaded, model, backend=backend)
        with torch.no_grad():
            outs.append(model.generate(ids, max_new_tokens=4, do_sample=False, **cache_kw(cache)))
    assert torch.equal(outs[0], outs[1])


# ---- make_cache provenance ---------------------------------------------------------------------------
def test_make_cache_refuses_other_weights_and_dtype(plan, tiny):
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(PlanError, match="fingerprint .* other real weights"):
        make_cache(plan, other)
    with pytest.raises(PlanError, match="dtype float32, the model runs in bfloat16"):
        make_cache(plan, copy.deepcopy(tiny).to(torch.bfloat16))
    meta_plan = plan.model_copy(update={"model": plan.model.model_copy(update={"on_meta": True})})
    with pytest.warns(UserWarning, match="fingerprint"):
        make_cache(meta_plan, other)  # compiled from a config: weights unknown, a note
    with pytest.raises(PlanError, match="strict"):
        make_cache(meta_plan, other, strict=True)


def test_make_cache_checks_in_memory_edits(plan, tiny):
    bad = plan.model_copy(update={"layers": plan.layers[:1]})
    with pytest.raises(PlanError, match="1 layers"):
        make_cache(bad, copy.deepcopy(tiny))


def test_fields_added_after_schema_1_keep_old_hashes(plan, tmp_path):
    """A plan written before ``config.planner`` / ``engine`` existed (neither key in the file) still loads."""
    raw = json.loads(plan.to_json())
    raw["config"].pop("planner")
    raw.pop("engine", None)
    body = json.dumps({k: v for k, v in raw.items() if k != "content_hash"}, sort_keys=True, separators=(",", ":"))
    raw["content_hash"] = hashlib.sha256(body.encode()).hexdigest()  # the hash as the old writer computed it
    assert load(_write(tmp_path, raw)) == plan


def test_megabyte_values_give_short_messages(plan, tmp_path):
    raw = _edit(plan, _set(["layers", 0, "heads", 1, "dtype"], "x" * 100_000))
    with pytest.raises(PlanError, match="not allowed") as e:
        load(_write(tmp_path, raw))
    assert len(str(e.value)) < 800
    raw = _edit(plan, lambda r: r["model"].update({"z" * 100_000: 1}))
    with pytest.raises(PlanError, match="Extra inputs") as e:
        load(_write(tmp_path, raw))
    assert len(str(e.value)) < 800
