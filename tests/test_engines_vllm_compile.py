"""The vLLM engine target without vLLM: candidates, the paged store's vLLM numerics, capacity prediction
against capacities vLLM 0.32 reported, engine-restricted compile, and one-line refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from kvcompile.engines import EngineError, get
from kvcompile.engines import vllm as ev
from kvcompile.strategies import Paged, reference_attention
from kvcompile.targets import load_target


def test_candidates_are_only_what_cpu_attn_executes_correctly():
    cands = ev.candidates(4096, load_target("cpu"))
    assert all(isinstance(c, Paged) for c in cands)
    assert {c.kv_dtype for c in cands} == {"bfloat16", "fp8_e4m3"}
    assert {c.window for c in cands} == {None, ev.window_for(4096)}
    # windows come with sink tokens (kept blocks + sink attention in the plugin), costed as vLLM holds them
    win = next(c for c in cands if c.window)
    assert 4 <= win.sinks <= 16 and win.reserve >= ev.reserve_for(win.window, 4096, 128) + 128
    # at a budget fp8 everywhere meets, bf16 is not offered (vLLM's group padding would cost capacity)
    assert {c.kv_dtype for c in ev.candidates(4096, load_target("cpu"), kv_budget=0.5)} == {"fp8_e4m3"}
    with pytest.raises(ValueError, match="not known"):
        get("tensorrt")


def _windowed_reference(q, k, v, window, scale, sinks=0):
    """Attention of the last q.shape[2] positions over all keys with the mask j <= i, (i - W < j or j < S)."""
    N, T = k.shape[2], q.shape[2]
    qpos = torch.arange(N - T, N)[:, None]
    kpos = torch.arange(N)[None, :]
    ok = (kpos <= qpos) & ((kpos > qpos - window) | (kpos < sinks))
    s = torch.einsum("bhtd,bhnd->bhtn", q.float(), k.float()) * scale
    p = torch.softmax(s.masked_fill(~ok, -math.inf), dim=-1)
    return torch.einsum("bhtn,bhnd->bhtd", p, v.float())


def _e4m3_toward_zero(x):
    """The e4m3 value nearest to x with |value| <= |x| (saturating at 448), by search over every code."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    a = x.abs().clamp(max=448)
    idx = torch.searchsorted(grid, a.flatten(), right=True) - 1
    return torch.sign(x) * grid[idx].view_as(x)


def test_fp8_encoding_rounds_toward_zero_on_the_e4m3_grid():
    from kvcompile.strategies.paged import e4m3_truncate

    x = torch.randn(4096) * torch.logspace(-4, 3, 4096)
    x = torch.cat([x, torch.tensor([448.0, 500.0, -1e4, 2.0**-9, 2.0**-10, 0.0, 1.0 + 2.0**-4])])
    torch.testing.assert_close(e4m3_truncate(x), _e4m3_toward_zero(x), atol=0, rtol=0)
    assert torch.equal(e4m3_truncate(x).to(torch.float8_e4m3fn).float(), e4m3_truncate(x))


@pytest.mark.parametrize("kv_dtype, sinks", [("bfloat16", 0), ("fp8_e4m3", 0), ("bfloat16", 4), ("fp8_e4m3", 4)])
def test_paged_store_window_and_format_match_the_engine_semantics(kv_dtype, sinks):
    torch.manual_seed(0)
    B, H, D, W, n_pre, n_dec = 1, 2, 32, 16, 37, 5
    s = Paged(kv_dtype=kv_dtype, window=W, sinks=sinks)
    store = s.new_store(batch=B, num_heads=H, head_dim=D, gqa=1, dtype=torch.float32, device=torch.device("cpu"))
    k = torch.randn(B, H, n_pre + n_dec, D) * 3
    v = torch.randn(B, H, n_pre + n_dec, D)
    q = torch.randn(B, H, n_pre + n_dec, D)
    # the engine writes every token before attending: the reference sees the stored format everywhere
    if kv_dtype == "fp8_e4m3":
        kq, vq = (_e4m3_toward_zero(x.bfloat16().float()) for x in (k, v))
    else:
        kq, vq = k.bfloat16().float(), v.bfloat16().float()
    scale = D**-0.5
    out = store.attend(q[:, :, :n_pre], k[:, :, :n_pre], v[:, :, :n_pre], torch.ones(B, n_pre, dtype=torch.bool), scale)
    store.append(k[:, :, :n_pre], v[:, :, :n_pre], q[:, :, :n_pre], torch.ones(B, n_pre, dtype=torch.bool))
    ref = _windowed_reference(q[:, :, :n_pre], kq[:, :, :n_pre], vq[:, :, :n_pre], W, scale, sinks)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for t in range(n_pre, n_pre + n_dec):
        one = torch.ones(B, 1, dtype=torch.bool)
        out = store.attend(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], one, scale)
        store.append(k[:, :, t : t + 1], v[:, :, t : t + 1], q[:, :, t : t + 1], one)
        ref = _windowed_reference(q[:, :, t : t + 1], kq[:, :, : t + 1], vq[:, :, : t + 1], W, scale, sinks)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert store.nbytes() == s.bytes_for(n_pre + n_dec, D, 4) * B * H
    assert store.k.shape[2] == sinks + W - 1  # the sinks are kept besides the window
    # and a window that is too short to see the first tokens does differ from full attention
    full, _ = reference_attention(q[:, :, -1:], kq, vq, None, scale)
    assert (out - full).abs().max() > 1e-3


# capacities vLLM 0.32 (CPU, SmolLM2-135M: 30 layers x 3 KV heads x 64, 256 MiB, max_model_len 4096, block 128)
# reported in issue 11: auto 11,648 tokens; fp8 23,296; fp8 with layers 0, 1, 29 kept bf16: 21,120.
@pytest.mark.parametrize(
    "bf16_layers, reported", [(range(30), 11_648), ((), 23_296), ((0, 1, 29), 21_120)]
)
def test_capacity_prediction_equals_what_vllm_reported(bf16_layers, reported):
    settings = [{"kv_cache_dtype": "auto" if i in bf16_layers else "fp8_e4m3", "sliding_window": None}
                for i in range(30)]
    cap = ev.predict_capacity(settings, num_kv_heads=3, head_dim=64, max_model_len=4096,
                              memory_bytes=256 << 20, block_size=128)
    assert abs(cap["tokens"] - reported) <= 128  # one block


def test_window_capacity_counts_vllm_reservation_and_group_padding():
    geo = {"num_kv_heads": 3, "head_dim": 64, "max_model_len": 4096, "memory_bytes": 256 << 20, "block_size": 64}
    full = [{"kv_cache_dtype": "fp8_e4m3", "sliding_window": None}]
    win = [{"kv_cache_dtype": "fp8_e4m3", "sliding_window": 256}]
    a = ev.predict_capacity(full * 10 + win * 20, **geo)
    b = ev.predict_capacity(full * 12 + win * 18, **geo)  # 18 windows padded to 2 groups of 12
    sunk = ev.predict_capacity(full * 12 + [{**win[0], "sinks": 16}] * 18, **geo)
    assert sunk["tokens"] < b["tokens"]  # one kept sink block per windowed group and request
    need_w = math.ceil((255 + ev.IN_FLIGHT) / 64) + 1
    assert a["concurrency"] == pytest.approx((geo["memory_bytes"] // (384 * 64 * 10)) / (64 + 2 * need_w))
    assert b["concurrency"] == pytest.approx((geo["memory_bytes"] // (384 * 64 * 12)) / (64 + 2 * need_w))
    assert sunk["concurrency"] == pytest.approx((geo["memory_bytes"] // (384 * 64 * 12)) / (64 + 2 * (need_w + 1)))


def test_engine_compile_is_per_layer_uniform_and_recorded(tmp_path, capsys):
    from kvcompile.cli import main
    from kvcompile.plan import load

    out = tmp_path / "8b.kvplan"
    argv = ["compile", "llama-3-8b", "--target", "cpu", "--kv-budget", "0.3", "--engine", "vllm", "--no-progress"]
    assert main([*argv, "-o", str(out)]) == 0
    assert "predicted KV capacity" in capsys.readouterr().out
    plan = load(out)
    assert plan.engine["name"] == "vllm" and plan.engine["version"]
    settings = ev.layer_settings(plan)
    assert settings == plan.engine["layers"] and len(settings) == 32
    for lp in plan.layers:
        assert len({json.dumps(h, sort_keys=True) for h in lp.heads}) == 1
        assert lp.heads[0]["name"] == "paged"
    assert plan.predicted["kv_bytes_at_context"] <= 0.3 * plan.predicted["full_bf16_kv_bytes_at_context"]
    assert plan.engine["predicted"]["capacity_ratio_vs_auto"] >= 1 / 0.3 * 0.9


def _plan_with(layers_spec, engine=None, tmp_path=None):
    from kvcompile.models import load
    from kvcompile.runtime.builders import plan_for

    m = load("llama-3-8b")
    plan = plan_for(m, lambda layer, head: layers_spec, 4096, target="cpu")
    if engine is not None:
        plan = plan.model_copy(update={"engine": engine}).sealed()
    path = tmp_path / "p.kvplan"
    plan.save(path)
    return plan, path


def test_int4_and_per_head_settings_are_refused_in_one_line(tmp_path):
    plan, _ = _plan_with({"name": "quant", "bits": 4}, tmp_path=tmp_path)
    with pytest.raises(EngineError, match="not executed by vLLM"):
        ev.layer_settings(plan)
    engine = {"name": "vllm", "version": ev.KNOWN_VERSION, "platform": "cpu", "layers": []}
    plan, _ = _plan_with({"name": "quant", "bits": 4}, engine=engine, tmp_path=tmp_path)
    with pytest.raises(EngineError) as e:
        ev.check(plan, version=ev.KNOWN_VERSION, platform="cpu")
    assert "\n" not in str(e.value)


def test_sink_layers_are_recorded_on_cpu_and_refused_where_not_implemented(tmp_path):
    spec = {"name": "paged", "kv_dtype": "fp8_e4m3", "window": 256, "sinks": 16}
    plan, _ = _plan_with(spec, tmp_path=tmp_path)
    assert ev.layer_settings(plan, "cpu")[0] == {"kv_cache_dtype": "fp8_e4m3", "sliding_window": 256, "sinks": 16}
    with pytest.raises(EngineError, match="CPU_ATTN only"):
        ev.layer_settings(plan, "gpu")
    plan = plan.model_copy(update={"engine": ev.record(plan, load_target("cpu"))})
    # vLLM's sliding-window prefix-cache hit search assumes the blocks before the window are freed
    assert ev.engine_kwargs(plan, "p.kvplan", model="m")["enable_prefix_caching"] is False
    assert "--no-enable-prefix-caching" in ev.serve_argv(plan, "p.kvplan", model="m")


def test_unknown_engine_is_one_line(capsys):
    from kvcompile.cli import main

    assert main(["compile", "llama-3-8b", "--target", "cpu", "--engine", "tensorrt", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "engine='tensorrt' is not known" in err[0]


@pytest.mark.parametrize("case", ["no-engine", "int4", "version"])
def test_serve_refuses_without_starting_a_server(tmp_path, case):
    spec = {"name": "quant", "bits": 4} if case == "int4" else {"name": "paged", "kv_dtype": "fp8_e4m3"}
    engine = None if case == "no-engine" else {
        "name": "vllm", "version": "0.0.1" if case == "version" else ev.installed_version() or ev.KNOWN_VERSION,
        "platform": "cpu", "layers": [{"kv_cache_dtype": "fp8_e4m3", "sliding_window": None}] * 32,
    }
    _, path = _plan_with(spec, engine=engine, tmp_path=tmp_path)
    r = subprocess.run([sys.executable, "-m", "kvcompile.cli", "serve", str(path), "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvcompile serve: error:")
    if ev.installed_version() is None and case != "no-engine":
        assert "not installed" in lines[0]
    else:
        want = {"no-engine": "not compiled for vLLM", "int4": "not executed by vLLM", "version": "0.0.1"}[case]
        assert want in lines[0]


def test_engine_plans_verify_at_their_context_with_three_samples_per_family():
    from kvcompile.api import optimize
    from kvcompile.models import load
    from kvcompile.passes.calibration_set import load_set
    from kvcompile.passes.verification import heldout_samples

    plan = optimize("llama-3-8b", target="cpu", context=2048, kv_budget=0.3, engine="vllm", progress=False)
    cset = load_set(None)
    assert plan.config.planner.verify_tokens == 2048 - ev.TURN_HEADROOM  # answers + second turns fit vLLM's context
    assert plan.config.planner.verify_samples == ev.VERIFY_PER_FAMILY * len(cset.heldout)
    # the held-out list is cycled with new seeds: 3 distinct samples of every family, none repeated
    tok = load("smollm2-135m").tokenizer
    ss = heldout_samples(tok, cset, 256, plan.config.planner.verify_samples)
    fams = [s.meta["family"] for s in ss]
    assert all(fams.count(f) == ev.VERIFY_PER_FAMILY for f in {it["kind"] for it in cset.heldout})
    assert len({(s.meta["family"], s.meta["seed"]) for s in ss}) == len(ss)
    assert len({tuple(s.ids[0].tolist()) for s in ss}) == len(ss)
    assert all(s.ids.shape[1] <= 256 for s in ss)


def _rows(fam, outcomes):
    """Suite rows: retrieval ``outcomes`` are correct flags; lm ones are (nll, tokens)."""
    if fam == "lm":
        return [{"family": fam, "seed": i, "nll": nll, "tokens": t} for i, (nll, t) in enumerate(outcomes)]
    return [{"family": fam, "seed": i, "correct": c} for i, c in enumerate(outcomes)]


def test_prediction_check_compares_changes_with_a_standard_error_band():
    measured = {"families": {"single": {"n": 3, "metric": "accuracy", "full": 1.0, "plan": 2 / 3},
                             "lm": {"n": 3, "metric": "ppl", "full": 10.0, "plan": 12.0}}}
    full = _rows("single", [1, 1, 0, 1, 1, 0, 1, 1]) + _rows("lm", [(100.0, 100), (200.0, 100), (150.0, 100)])
    plan = _rows("single", [1, 0, 0, 1, 1, 0, 1, 1]) + _rows("lm", [(120.0, 100), (215.0, 100), (166.0, 100)])
    chk = ev.prediction_check(measured, full, plan)
    s, lm = chk["families"]["single"], chk["families"]["lm"]
    assert s["measured"]["delta"] == pytest.approx(-1 / 8) and s["predicted"]["delta"] == pytest.approx(-1 / 3)
    # one discordant pair of 8: variance (1 + 1) / (8 + 2), se over both sample sets
    assert s["tolerance"] == pytest.approx(ev.Z * math.sqrt(0.2 * (1 / 3 + 1 / 8)))
    assert s["within"] and s["n_predicted"] == 3 and s["n_measured"] == 8
    ratios = [0.2, 0.15, 0.16]
    mean = sum(ratios) / 3
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratios) / 2)
    assert lm["measured"]["ppl_delta"] == pytest.approx(math.expm1(51 / 300))
    assert lm["predicted"]["ppl_delta"] == pytest.approx(0.2)
    assert lm["log_ratio"]["tolerance"] == pytest.approx(ev.Z * sd * math.sqrt(2 / 3))
    assert lm["within"]  # |0.170 - log 1.2| = 0.012 < 0.043
    assert "retrieval_pooled" not in chk  # one retrieval family: nothing to pool
    two = {"families": {**measured["families"], "multi": {"n": 3, "metric": "accuracy", "full": 1.0, "plan": 1.0}}}
    multi = _rows("multi", [1, 1, 1, 1])
    pooled = ev.prediction_check(two, full + multi, plan + multi)["retrieval_pooled"]
    assert pooled["n_predicted"] == 6 and pooled["n_measured"] == 12
    assert pooled["predicted_delta"] == pytest.approx(-1 / 6) and pooled["measured_delta"] == pytest.approx(-1 / 16)
    assert pooled["tolerance"] == pytest.approx(ev.Z * math.sqrt(2 / 14 * (1 / 6 + 1 / 12)))
    # a prediction far outside the band is reported as such; the same samples leave only one flip / 0.05
    far = {"families": {"lm": {"n": 3, "metric": "ppl", "full": 10.0, "plan": 20.0}}}
    assert ev.prediction_check(far, full, plan)["within"] is False
    same = ev.prediction_check(measured, full, plan, same_samples=True)
    assert same["families"]["single"]["tolerance"] == pytest.approx(1 / 8)
    assert not same["families"]["single"]["within"]  # -1/8 vs -1/3 is more than one flip in 8
    with pytest.raises(ValueError, match="not the same samples"):
        ev.prediction_check(measured, full[:-1], plan)


@pytest.mark.slow
def test_engine_plan_is_verified_at_its_served_length_without_rescaling(smol):
    from kvcompile.api import optimize

    plan = optimize(smol.model, tokenizer=smol.tokenizer, target="cpu", context=640, kv_budget=0.45, engine="vllm",
                    calibration="default:1x256", verify_samples=2, progress=False)
    m = plan.measured
    assert m["tokens"] == 640 - ev.TURN_HEADROOM and m["samples"] == 2
    assert {f: v["n"] for f, v in m["families"].items()} == {"single": 1, "multi": 1}
    # vLLM's windows are absolute: the verification ran the plan's own window, it did not rescale it
    assert any("the engine's settings as they are" in n for n in plan.notes)
    assert not any("rescaled" in n for n in plan.notes)
    assert any(s["sliding_window"] == ev.window_for(640) for s in plan.engine["layers"])
