"""Lowering plans to schedules, and the schedule interpreter against the runtime's torch path."""

from __future__ import annotations

import pytest
import torch

from kvcompile._compat import cache_kw
from kvcompile.codegen.lower import emit_kernels, load_plan_kernels, lower, lower_strategies, with_codegen
from kvcompile.codegen.schedule import Instr, Schedule
from kvcompile.runtime.attention import attend_layer
from kvcompile.runtime.cache import KVCompileLayer
from kvcompile.runtime.interpreter import Interpreter, attach
from kvcompile.strategies import from_spec

Q4 = {"name": "quant", "bits": 4, "group": 8, "residual": 8}
H2O = {"name": "heavy_hitter", "budget": 24, "recent": 8}
WINDOW = {"name": "sink_window", "sinks": 2, "window": 20}
MIXED = [
    [from_spec(Q4), from_spec({"name": "full"}), from_spec(Q4)],
    [from_spec(H2O), from_spec(WINDOW), from_spec({"name": "fp8"})],
]


def test_lower_mixed_plan():
    sched = lower_strategies(MIXED, head_dim=64, gqa=3)
    dec0 = sched.select("decode", 0)
    assert [i.op for i in dec0] == ["attend_decode", "push_residual", "append"]
    assert dec0[0].kernel_uri == "decode_mixed_hd64_gqa3_s-q4g8v8r8-full_f32" and dec0[0].arg("groups") == (
        0,
        1,
    )
    flush = sched.select("flush", 0)
    assert [(i.op, i.group, i.arg("threshold")) for i in flush] == [("flush_quant", 0, 16)]
    assert flush[0].kernel_uri == "quant_append_hd64_b4_g8_vg8_f32"
    dec1 = sched.select("decode", 1)
    # sink_window + fp8 share one launch; H2O gets its own, which also returns the per-key attention mass
    assert [(i.op, i.group) for i in dec1] == [("attend_decode", -1), ("attend_scored", 0), ("append", 2)]
    assert dec1[0].kernel_uri == "decode_mixed_hd64_gqa3_s-compact-fp8_f32"
    assert dec1[1].kernel_uri == "decode_compact_scored_hd64_gqa3_f32"
    assert [(i.op, i.group) for i in sched.select("evict", 1)] == [("append", 0), ("append", 1)]
    assert sched.launches("decode") == 3  # one per layer whatever the mix, plus one per H2O group
    assert all(i.kernel_uri is None for i in sched.select("prefill"))
    assert set(sched.kernels) == {i.kernel_uri for i in sched.instrs if i.kernel_uri}
    assert Schedule.from_json(sched.to_json(), sched.kernels) == sched


def test_uniform_layers_use_single_format_kernels():
    sched = lower_strategies([[from_spec(Q4)] * 3, [from_spec({"name": "full"})] * 3], head_dim=80, gqa=3)
    uris = [i.kernel_uri for i in sched.select("decode") if i.op == "attend_decode"]
    assert uris == ["decode_quant_hd80_b4_g8_vg8_gqa3_r8_f32", "decode_full_hd80_gqa3_f32"]


def test_instr_validation():
    with pytest.raises(ValueError, match="op="):
        Instr("launch_rockets", "decode", 0, 0)
    with pytest.raises(ValueError, match="phase="):
        Instr("append", "teardown", 0, 0)
    with pytest.raises(ValueError, match="backend="):
        Interpreter(Schedule(()), "cuda-magic")


def _drive(layers, steps, seed=0, T0=21, B=2, D=64, G=3):
    """Prefill T0 tokens (row 1 left-padded by 3) then ``steps`` decode tokens through every layer."""
    g = torch.Generator().manual_seed(seed)
    outs = [[] for _ in layers]
    for step in range(steps + 1):
        T = T0 if step == 0 else 1
        q = torch.randn(B, 3 * G, T, D, generator=g)
        k, v = torch.randn(B, 3, T, D, generator=g), torch.randn(B, 3, T, D, generator=g)
        valid = torch.ones(B, T, dtype=torch.bool)
        if step == 0:
            valid[1, :3] = False
        for i, layer in enumerate(layers):
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            outs[i].append(attend_layer(layer, q, k, v, valid, 0.125))
    return outs


@pytest.mark.parametrize("row", [0, 1])
def test_interpreter_validate_matches_the_torch_runtime(row):
    """Kernels (CPU interpreter) vs the stores' own reference, step by step, over flushes and evictions."""
    ref_layer = KVCompileLayer(0, MIXED[row], 64, 3, backend="torch")
    fast = KVCompileLayer(0, MIXED[row], 64, 3, backend="triton-interpret")

    class _Cache:
        layers = [fast]
        backend = "triton-interpret"

    interp = attach(_Cache(), validate=True)
    ref_out, fast_out = _drive([ref_layer, fast], steps=12)
    for a, b in zip(ref_out, fast_out, strict=True):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=5e-5)
    assert interp.counts["attend_decode"] == 12
    assert interp.errors["attend_decode"] < 5e-5
    if row == 1:  # H2O: kernel attention and the mass it hands to the store (which drives eviction)
        assert interp.errors["attend_scored"] < 5e-5 and interp.errors["attend_scored_mass"] < 1e-5
        torch.testing.assert_close(fast.stores[0].score, ref_layer.stores[0].score, atol=1e-4, rtol=1e-4)
        assert torch.equal(fast.stores[0].pos, ref_layer.stores[0].pos)  # the same tokens were evicted
    if row == 0:
        assert interp.errors["flush_quant"] == 0.0  # kernel codes/scales equal _quant_ref's exactly
        assert fast.stores[0].buf.nq == ref_layer.stores[0].buf.nq == 24  # 33 tokens: flushed twice
    assert fast.nbytes() == ref_layer.nbytes()


def test_interpreter_torch_backend_runs_the_schedule_references():
    ref_layer = KVCompileLayer(0, MIXED[0], 64, 3, backend="torch")
    sched_layer = KVCompileLayer(0, MIXED[0], 64, 3, backend="torch")

    class _Cache:
        layers = [sched_layer]
        backend = "torch"

    interp = attach(_Cache())
    ref_out, sched_out = _drive([ref_layer, sched_layer], steps=4, seed=1)
    assert interp.counts["attend_decode"] == 4 and interp.counts["flush_quant"] == 5
    for a, b in zip(ref_out, sched_out, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_plan_artifact_carries_verified_kernels(smol, tmp_path, monkeypatch):
    from kvcompile import plan as plan_mod
    from kvcompile.codegen.cache import KernelSourceError, clear_memory_cache
    from kvcompile.runtime import make_cache, mixed_plan
    from kvcompile.runtime.interpreter import _ATTACHED

    monkeypatch.setenv("KVCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    plan = with_codegen(
        mixed_plan(smol.model, [Q4, "full", {"name": "sink_window", "sinks": 4, "window": 12}])
    )
    assert Schedule.from_json(plan.schedule, lower(plan).kernels) == lower(plan)
    assert (
        set(plan.kernels)
        == set(emit_kernels(plan))
        == {
            "decode_mixed_hd64_gqa3_s-q4g8v8r8-full-compact_f32",
            "quant_append_hd64_b4_g8_vg8_f32",
        }
    )
    loaded = plan_mod.load(plan.save(tmp_path / "p.kvplan"))
    assert set(load_plan_kernels(loaded)) == set(plan.kernels)
    uri = "quant_append_hd64_b4_g8_vg8_f32"
    bad = dict(loaded.kernels)
    bad[uri] = {**bad[uri], "source": bad[uri]["source"].replace("0.5", "0.4")}
    with pytest.raises(KernelSourceError, match=uri):
        load_plan_kernels(loaded.model_copy(update={"kernels": bad}))
    # serving: a kernel-backend cache runs the plan's own (hash-checked) sources, and refuses edited ones
    cache = make_cache(loaded, smol.model, backend="triton-interpret")
    try:
        interp = _ATTACHED[cache.layers[0]][0]
        assert set(interp._kernels) == set(plan.kernels) and interp.schedule == lower(loaded)
        with pytest.raises(KernelSourceError):
            make_cache(loaded.model_copy(update={"kernels": bad}), smol.model, backend="triton-interpret")
    finally:
        smol.model.set_attn_implementation("sdpa")
        clear_memory_cache()


@pytest.mark.slow
def test_smollm2_greedy_generation_interpreter_validate_equals_torch(smol):
    """Bar: the interpreter (Triton kernels under TRITON_INTERPRET, validate=True) generates the same
    greedy tokens as the torch runtime on SmolLM2 with a per-head KIVI-int4 / H2O / sink+window plan
    (H2O evicts during decode from the mass the kernel returns)."""
    from kvcompile.runtime import make_cache, mixed_plan

    model, tok = smol.model, smol.tokenizer
    prompt = "The pass key is 71432. Remember it. Question: What is the pass key? Answer with the number."
    ids = tok(prompt + " The pass key is", return_tensors="pt").input_ids
    h2o = {"name": "heavy_hitter", "budget": 33, "recent": 8}  # 31 prompt tokens: evicts from decode step 3
    q4 = {**Q4, "v_group": 64}  # one value group per token, the setting this pass-key check was made with
    plan = mixed_plan(model, [q4, h2o, {"name": "sink_window", "sinks": 4, "window": 24}], context=256)
    tokens, interp = {}, None
    for backend in ("torch", "triton-interpret"):
        cache = make_cache(plan, model, backend=backend)
        if backend != "torch":
            interp = attach(cache, validate=True)
        out = model.generate(ids, **cache_kw(cache), max_new_tokens=6, do_sample=False)
        tokens[backend] = out[0, ids.shape[1] :].tolist()
    model.set_attn_implementation("sdpa")
    assert tokens["triton-interpret"] == tokens["torch"]
    assert "714" in tok.decode(tokens["torch"])
    assert interp.counts["attend_decode"] == 30 * 5 and interp.errors["attend_decode"] < 1e-4
    assert interp.errors["flush_quant"] == 0.0
    assert interp.counts["attend_scored"] == 30 * 5 and interp.errors["attend_scored_mass"] < 1e-5
    assert cache.layers[0].stores[1].pos.shape[-1] == 33  # H2O evicted down to its budget during decode


def test_emit_code_pass_puts_schedule_and_kernels_in_facts():
    from kvcompile.codegen.lower import emit_code
    from kvcompile.ir import AttentionSite, ModelInfo, PosKind, Program

    sites = tuple(
        AttentionSite(i, f"layers.{i}.attn", 12, 3, 64, 64, PosKind.ROPE, 1e4, None, "bfloat16", 0.125)
        for i in range(2)
    )
    model = ModelInfo("toy", "LlamaForCausalLM", "llama", "fp", 1, 2, 10, 768, 2, "bfloat16", True)
    assignment = ((Q4, {"name": "full"}, Q4), ({"name": "fp8"},) * 3)
    out = emit_code(Program(model, sites, assignment), None)
    sched = Schedule.from_json(out.facts["schedule"])
    assert [i.kernel_uri for i in sched.select("decode") if i.op == "attend_decode"] == [
        "decode_mixed_hd64_gqa4_s-q4g8v8r8-full_bf16",
        "decode_fp8_hd64_gqa4_bf16",
    ]
    assert set(out.facts["kernels"]) == {i.kernel_uri for i in sched.instrs if i.kernel_uri}
    with pytest.raises(ValueError, match="assignment"):
        emit_code(Program(model, sites), None)


def test_kernel_backend_needs_an_attached_schedule_and_cpu_matches_the_reference():
    """Serving never lowers: a kernel-backend layer without a schedule fails with a one-line error;
    once attached (what make_cache does), the cpu backend's C kernels match the torch reference."""
    fast = KVCompileLayer(0, MIXED[1], 64, 3, backend="cpu")
    with pytest.raises(RuntimeError, match="runs a schedule"):
        _drive([fast], steps=0)
    row = [from_spec(Q4), from_spec(H2O), from_spec({"name": "fp8"})]
    ref_layer = KVCompileLayer(0, row, 64, 3, backend="torch")
    cpu = KVCompileLayer(0, row, 64, 3, backend="cpu")
    interp = attach(_Layers([cpu]))
    ref_out, cpu_out = _drive([ref_layer, cpu], steps=40, seed=2)  # over a KIVI flush
    for a, b in zip(ref_out, cpu_out, strict=True):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=5e-5)
    assert interp.counts["attend_decode"] == 40 and interp.counts["attend_scored"] == 40


class _Layers:
    """The part of a cache ``attach`` reads: ``layers`` and ``backend``."""

    def __init__(self, layers):
        self.layers, self.backend = layers, layers[0].backend
