"""Plan artifact: round trip, content hash, PlanError on corrupt / truncated / tampered / wrong-version files,
atomic writes, and the Program -> Plan mapping of ``api.plan_from_program``."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from kvcompile import load
from kvcompile.api import plan_from_program
from kvcompile.capture import capture
from kvcompile.ir import Program
from kvcompile.passes import PassContext, run_pipeline
from kvcompile.plan import PlanConfig, PlanError
from kvcompile.targets import load_target


def _assign_full(program: Program, ctx: PassContext) -> Program:
    row = lambda s: tuple({"name": "full", "dtype": "model"} for _ in range(s.num_kv_heads))
    return dataclasses.replace(program, assignment=tuple(row(s) for s in program.sites))


@pytest.fixture(scope="module")
def compiled():
    cfg = T.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ctx = PassContext(target=load_target("h100-sxm:2"), config=PlanConfig(context=1000, batch=3), model=model)
    program = run_pipeline(capture(model, name="tiny-llama"), ctx, pipeline=[("assign_full", _assign_full)])
    return program, ctx


@pytest.fixture()
def plan(compiled):
    return plan_from_program(*compiled)


def test_plan_from_program_fields(compiled, plan):
    program, ctx = compiled
    assert plan.model.name == "tiny-llama" and plan.model.arch == "LlamaForCausalLM"
    assert plan.model.fingerprint == program.model.fingerprint
    assert [s.num_kv_heads for s in plan.model.sites] == [2, 2, 2]
    assert plan.target.name == "h100-sxm" and plan.target.gpus == 2
    assert plan.layers[1].heads == [{"name": "full", "dtype": "model"}] * 2
    # 3 layers * 2 heads * (16 + 16) dims * 4 bytes (fp32) per token
    per_token = 3 * 2 * 32 * 4
    assert plan.predicted["full_kv_bytes_per_token"] == per_token
    assert plan.predicted["full_bf16_kv_bytes_per_token"] == per_token // 2
    assert plan.predicted["kv_bytes_at_context"] == per_token * 1000 * 3
    assert plan.predicted["full_kv_bytes_at_context"] == per_token * 1000 * 3
    assert plan.predicted["full_bf16_kv_bytes_at_context"] == per_token * 1000 * 3 // 2
    assert plan.predicted["kv_bytes_per_token"] == per_token
    assert plan.measured is None and plan.placement is None and plan.notes == []
    assert plan.content_hash == plan.compute_hash()


def test_plan_from_program_copies_facts(compiled):
    program, ctx = compiled
    program = program.with_facts(
        predicted={"decode_step_s": 0.5, "kv_bytes_at_context": -1},
        measured={"decode_step_s": 0.6},
        placement={"tensor_parallel": 2},
        schedule=({"op": "attend", "layer": 0},),
        kernels={"k": {"sha256": "0" * 64}},
        notes=["hello"],
    )
    plan = plan_from_program(program, ctx)
    assert plan.predicted["decode_step_s"] == 0.5
    assert plan.predicted["kv_bytes_at_context"] == 3 * 2 * 32 * 4 * 1000 * 3  # computed values win
    assert plan.measured == {"decode_step_s": 0.6}
    assert plan.placement == {"tensor_parallel": 2}
    assert plan.schedule == [{"op": "attend", "layer": 0}]
    assert plan.kernels == {"k": {"sha256": "0" * 64}}
    assert plan.notes == ["hello"]


def test_plan_from_program_needs_assignment(compiled):
    program, ctx = compiled
    with pytest.raises(ValueError, match="no strategy assignment"):
        plan_from_program(dataclasses.replace(program, assignment=None), ctx)


def test_round_trip(plan, tmp_path):
    path = plan.save(tmp_path / "p.kvplan")
    back = load(path)
    assert back == plan
    assert back.content_hash == plan.content_hash == back.compute_hash()
    assert back.to_json() == plan.to_json()
    assert os.listdir(tmp_path) == ["p.kvplan"]  # atomic write leaves no temp file


def test_atomic_write_failure_keeps_old_file(plan, tmp_path, monkeypatch):
    path = plan.save(tmp_path / "p.kvplan")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        plan.model_copy(update={"notes": ["changed"]}).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.kvplan"]


def _drop(raw: dict, key: str) -> dict:
    return {k: v for k, v in raw.items() if k != key}


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t, r: "\x00\x01garbage", "not valid JSON"),
        (lambda t, r: t[: len(t) // 2], "not valid JSON, the file is corrupt or truncated"),
        (lambda t, r: "", "not valid JSON"),
        (lambda t, r: "[1, 2]", "expected a JSON object"),
        (lambda t, r: json.dumps({**r, "schema_version": 2}), "schema_version 2 is not supported"),
        (lambda t, r: json.dumps(_drop(r, "schema_version")), "schema_version None"),
        (lambda t, r: json.dumps({**r, "config": {**r["config"], "context": 999}}), "content hash mismatch"),
        (lambda t, r: t.replace('"dtype": "model"', '"dtype": "bfloat16"', 1), "content hash mismatch"),
        (lambda t, r: json.dumps({**r, "content_hash": ""}), "no content_hash"),
        (lambda t, r: json.dumps({**r, "extra_field": 1}), "invalid plan: extra_field"),
        (lambda t, r: json.dumps(_drop(r, "layers")), "invalid plan: layers"),
    ],
    ids=[
        "garbage", "truncated", "empty", "not-object", "wrong-version", "no-version", "tampered-config",
        "tampered-head", "no-hash", "extra-field", "missing-field",
    ],
)
def test_bad_files_raise_plan_error(plan, tmp_path, mutate, reason):
    path = plan.save(tmp_path / "p.kvplan")
    text = path.read_text()
    path.write_text(mutate(text, json.loads(text)))
    with pytest.raises(PlanError, match=reason) as e:
        load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_unknown_strategy_with_valid_hash_is_rejected(plan, tmp_path):
    first = plan.layers[0].model_copy(update={"heads": [{"name": "nope"}] * 2})
    bad = plan.model_copy(update={"layers": [first, *plan.layers[1:]]})
    path = bad.save(tmp_path / "p.kvplan")  # sealed: hash is valid, content is not
    with pytest.raises(PlanError, match="layer 0 head 0: unknown strategy 'nope'"):
        load(path)


def test_missing_file(tmp_path):
    with pytest.raises(PlanError, match="cannot read"):
        load(tmp_path / "absent.kvplan")
