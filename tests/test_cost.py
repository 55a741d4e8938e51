"""Roofline cost model against hand-computed numbers on a toy program and target."""

from __future__ import annotations

import pytest

from kvcompile import cost
from kvcompile.ir import AttentionSite, ModelInfo, PosKind, Program
from kvcompile.strategies import Full
from kvcompile.targets import Target


def _program(layers=2, hq=4, hk=2, d=8, dtype="bfloat16", params=1000, pbytes=2000) -> Program:
    info = ModelInfo("toy", "ToyForCausalLM", "toy", "fp", params, pbytes, 100, 32, layers, dtype, False)
    sites = tuple(
        AttentionSite(i, f"layers.{i}.attn", hq, hk, d, d, PosKind.ROPE, 1e4, None, dtype, d**-0.5)
        for i in range(layers)
    )
    return Program(info, sites)


def _target(mem=10**6, bw=1000.0, flops=1e4, gpus=1) -> Target:
    return Target(
        name="toy", description="toy", source="hand-made numbers for tests", kind="gpu", vendor="none",
        memory_bytes=mem, memory_bandwidth=bw, flops={"fp32": flops / 2, "bf16": flops, "fp8": 0, "int8": 0},
        sm_count=1, smem_per_sm_bytes=0, l2_bytes=0, host_link="pcie", host_link_bandwidth=1.0,
        interconnect="none", interconnect_bandwidth=0.0, interconnect_latency_s=0.0, kv_dtypes=["bfloat16"],
        gpus=gpus,
    )


def test_kv_bytes_and_decode_roofline_by_hand():
    p, t = _program(), _target()
    strats = cost.uniform(p, Full())
    # 2 layers * 2 heads * (K+V: 2 * 8 dims * 2 bytes = 32) = 128 bytes/token
    assert cost.kv_bytes(p, strats, 10) == 1280
    step = cost.decode_step(p, strats, t, batch=3, context=10)
    # bytes: weights 2000 + 3 seqs * 1280 = 5840 -> 5.84 s at 1000 B/s
    assert step.bytes_moved == 5840 and step.memory_s == pytest.approx(5.84)
    # flops: 2*1000*3 linear + 3 * 4 heads * (4 * G=2 * D=8 * 10 tokens) = 6000 + 7680
    assert step.flops == pytest.approx(13680) and step.compute_s == pytest.approx(1.368)
    assert step.seconds == pytest.approx(5.84) and step.bound == "memory"


def test_compute_bound_prefill_by_hand():
    p, t = _program(), _target()
    pre = cost.prefill(p, cost.uniform(p, Full()), t, batch=2, tokens=10)
    # 2 * (2*1000*10 + 2 layers * 2 * 4 heads * 8 * 10^2) = 2 * (20000 + 12800) = 65600 FLOP
    assert pre.flops == pytest.approx(65600) and pre.compute_s == pytest.approx(6.56)
    # bytes: 2000 + 2 * 1280 = 4560 -> 4.56 s; compute-bound
    assert pre.memory_s == pytest.approx(4.56) and pre.bound == "compute"


def test_max_batch_and_predicted_dict():
    p, t = _program(), _target(mem=2000 + 1280 * 7 + 1279)
    strats = cost.uniform(p, Full())
    assert cost.max_batch(p, strats, t, 10) == 7
    pred = cost.predicted(p, strats, t, batch=2, context=10)
    assert pred["memory_bytes"] == 2000 + 2 * 1280 and pred["fits"]
    assert pred["kv_ratio_vs_full_bf16"] == pytest.approx(1.0)
    assert pred["tokens_per_s"] == pytest.approx(2 / pred["decode_step_s"])
    assert pred["max_batch"] == 7 and pred["baseline_full_bf16"]["max_batch"] == 7
    # a float32 cache is twice the bf16 reference and halves the max batch
    f32 = cost.predicted(p, cost.uniform(p, Full(dtype="float32")), t, batch=1, context=10)
    assert f32["kv_ratio_vs_full_bf16"] == pytest.approx(2.0) and f32["max_batch"] == 3


def test_multi_gpu_scales_capacity_and_bandwidth():
    p = _program()
    one, eight = _target(), _target(gpus=8)
    s = cost.uniform(p, Full())
    one_s = cost.decode_step(p, s, one, 1, 10).memory_s
    assert cost.decode_step(p, s, eight, 1, 10).memory_s == pytest.approx(one_s / 8)
    assert cost.max_batch(p, s, eight, 10) > 8 * cost.max_batch(p, s, one, 10) - 8


def test_weights_do_not_fit():
    p = _program(pbytes=10**7)
    assert cost.max_batch(p, cost.uniform(p, Full()), _target(), 10) == 0
