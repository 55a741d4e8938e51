"""Fused decode kernels for compositions (``quant_pos``: selected positions + packed KIVI codes +
fp residual) and MiKV (low-bit evicted tokens + full-precision selected ones), alone and inside the
mixed per-layer launch, against the stores' own torch ``attend`` under ``TRITON_INTERPRET=1`` with
odd shapes (head_dim 48, GQA 3, left padding, partial groups, several flushes)."""

from __future__ import annotations

import pytest
import torch

from kvcompile.codegen.decode_mixed import decode_mixed
from kvcompile.codegen.keys import slot_for
from kvcompile.codegen.lower import lower_strategies
from kvcompile.runtime.attention import attend_layer
from kvcompile.runtime.cache import KVCompileLayer
from kvcompile.runtime.interpreter import _group_view, attach
from kvcompile.strategies import from_spec

QPOS = {
    "name": "compose",
    "select": {"name": "snapkv", "budget": 40, "obs_window": 8},
    "quant": {"name": "quant", "bits": 4, "group": 8, "residual": 8},
}
QPOS2 = {
    "name": "compose",
    "select": {"name": "sink_window", "sinks": 2, "window": 30},
    "quant": {"name": "quant", "bits": 2, "group": 8, "residual": 4},
}
MIKV = {"name": "mikv", "select": {"name": "sink_window", "sinks": 2, "window": 20}, "low_bits": 4, "group": 8}
B, Hg, G, D = 2, 2, 3, 48


def _feed(store, steps, g, T0=53):
    """Prefill T0 tokens (row 1 left-padded by 3), then ``steps`` single tokens; yields each next step's inputs."""
    for step in range(steps + 1):
        T = T0 if step == 0 else 1
        q = torch.randn(B, Hg * G, T, D, generator=g)
        k, v = torch.randn(B, Hg, T, D, generator=g), torch.randn(B, Hg, T, D, generator=g)
        valid = torch.ones(B, T, dtype=torch.bool)
        if step == 0:
            valid[1, :3] = False
        yield q, k, v, valid
        store.attend(q, k, v, valid, 0.2)
        store.append(k, v, q, valid)


@pytest.mark.parametrize("spec", [QPOS, QPOS2, MIKV], ids=["snapkv+q4", "window+q2", "mikv"])
def test_fused_decode_matches_the_store_reference(spec):
    strategy = from_spec(spec)
    assert slot_for(strategy, D) is not None
    store = strategy.new_store(batch=B, num_heads=Hg, head_dim=D, gqa=G, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(3)
    checked = 0
    for step, (q, k, v, valid) in enumerate(_feed(store, 21, g)):
        if step == 0:
            continue
        want = store.attend(q, k, v, valid, 0.2)
        view = _group_view(store, strategy, tuple(range(Hg)), k, v)
        got = decode_mixed(q, [view], scale=0.2, lead=torch.tensor([0, 3]))
        torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)
        checked += 1
    assert checked == 21


def test_mixed_layer_launch_with_quant_pos_and_mikv_matches_torch_runtime():
    row = [from_spec(QPOS), from_spec(MIKV), from_spec({"name": "full"})]
    sched = lower_strategies([row], head_dim=64, gqa=3)
    assert [i.op for i in sched.select("decode", 0)][0] == "attend_decode"
    assert "qp4g8v8r8" in next(iter(sched.kernels)) and "mikv4g8" in next(iter(sched.kernels))
    ref = KVCompileLayer(0, row, 64, 3, backend="torch")
    fast = KVCompileLayer(0, row, 64, 3, backend="triton-interpret")

    class _Cache:
        layers, backend = [fast], "triton-interpret"

    interp = attach(_Cache(), validate=True)
    gen = torch.Generator().manual_seed(5)
    for step in range(13):
        T = 45 if step == 0 else 1
        q = torch.randn(2, 9, T, 64, generator=gen)
        k, v = torch.randn(2, 3, T, 64, generator=gen), torch.randn(2, 3, T, 64, generator=gen)
        valid = torch.ones(2, T, dtype=torch.bool)
        if step == 0:
            valid[1, :3] = False
        for layer in (ref, fast):
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
        a = attend_layer(ref, q, k, v, valid, 0.125)
        b = attend_layer(fast, q, k, v, valid, 0.125)
        torch.testing.assert_close(b, a, atol=5e-5, rtol=5e-5)
    assert interp.counts["attend_decode"] == 12 and interp.errors["attend_decode"] < 5e-5


@pytest.mark.parametrize("bits,v_bits", [(4, 2), (8, 4), (2, 8)])
def test_asymmetric_kv_bits_kernels_match_references(bits, v_bits):
    """K/V bits differ (K4V2, K8V4, K2V8): the flush kernel packs values at v_bits exactly as the
    reference, and the Triton and C decode kernels equal the reference decode."""
    from kvcompile.codegen import cpu
    from kvcompile.codegen import reference as ref
    from kvcompile.codegen.decode_quant import decode_quant
    from kvcompile.codegen.quant_append import quantize_append

    g = torch.Generator().manual_seed(bits * 8 + v_bits)
    Bq, H, Gq, Dq, n = 2, 3, 3, 48, 48
    k, v = torch.randn(Bq, H, n, Dq, generator=g), torch.randn(Bq, H, n, Dq, generator=g)
    got = quantize_append(k, v, bits=bits, group=16, v_group=16, v_bits=v_bits)
    kc, ks, kz = ref.quantize_keys(k, bits, 16)
    vc, vs, vz = ref.quantize_values(v, v_bits, 16)
    names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    for name, want in zip(names, (kc, ks, kz, vc, vs, vz), strict=True):
        assert torch.equal(got[name], want), name
    q = torch.randn(Bq, H * Gq, 1, Dq, generator=g)
    kt, vt = torch.randn(Bq, H, 5, Dq, generator=g), torch.randn(Bq, H, 5, Dq, generator=g)
    lead = torch.tensor([3, 0])
    want = ref.decode_quant(q, kc, ks, kz, vc, vs, vz, bits=bits, group=16, v_group=16, lead=lead, k_tail=kt,
                            v_tail=vt, v_bits=v_bits, scale=0.2)  # fmt: skip
    tri = decode_quant(q, kc, ks, kz, vc, vs, vz, bits=bits, group=16, v_group=16, lead=lead, k_tail=kt, v_tail=vt,
                       v_bits=v_bits, scale=0.2)  # fmt: skip
    torch.testing.assert_close(tri, want, atol=5e-5, rtol=5e-5)
    if cpu.available():
        c = cpu.decode_kivi(q, kc, ks, kz, vc, vs, vz, kt[:, :, :4], vt[:, :, :4], kt[:, :, 4:], vt[:, :, 4:],
                            bits=bits, group=16, v_group=16, nq=n, scale=0.2, lead=lead, v_bits=v_bits)  # fmt: skip
        torch.testing.assert_close(c, want, atol=5e-5, rtol=5e-5)
