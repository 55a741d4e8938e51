"""Every decode / quantize kernel against its torch reference (CPU: TRITON_INTERPRET=1, small sizes).

Odd shapes throughout: 97 tokens, head_dim 80, GQA 9/3 (G = 3), two rows with different left padding.
"""

from __future__ import annotations

import pytest
import torch

from kvcompile.codegen import reference as ref
from kvcompile.codegen.decode_compact import decode_compact, decode_fp8, decode_full
from kvcompile.codegen.decode_quant import decode_quant
from kvcompile.codegen.quant_append import quantize_append
from kvcompile.strategies import from_spec

# dtype -> (atol, rtol) of kernel vs torch reference (both accumulate in float32; the output is rounded
# to the query dtype, so the tolerance is about one ulp of that dtype at |out| ~ 1)
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

B, HG, G, D, N = 2, 3, 3, 80, 97
DEV = torch.device("cpu")  # the interpreter tests run on CPU tensors (GPU tests: test_codegen_gpu.py)


def close(out, expect, dtype):
    atol, rtol = TOL[dtype]
    assert out.dtype == expect.dtype == dtype
    torch.testing.assert_close(out.float(), expect.float(), atol=atol, rtol=rtol)


def qkv(dtype, n=N, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HG * G, 1, d, generator=g).to(dtype)
    k = torch.randn(B, HG, n, d, generator=g).to(dtype)
    v = torch.randn(B, HG, n, d, generator=g).to(dtype)
    kn = torch.randn(B, HG, 1, d, generator=g).to(dtype)
    vn = torch.randn(B, HG, 1, d, generator=g).to(dtype)
    return q, k, v, kn, vn


LEAD = torch.tensor([0, 7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_full_matches_reference(dtype, splits):
    q, k, v, kn, vn = qkv(dtype)
    out = decode_full(q, k, v, scale=0.1, lead=LEAD, k_new=kn, v_new=vn, num_splits=splits)
    close(out, ref.decode_full(q, k, v, scale=0.1, lead=LEAD, k_new=kn, v_new=vn), dtype)
    # the reference itself is plain softmax attention with padding keys removed (row 1 drops 7 keys)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q[1:].float(),
        torch.cat([k, kn], 2)[1:, :, 7:].float(),
        torch.cat([v, vn], 2)[1:, :, 7:].float(),
        scale=0.1,
        enable_gqa=True,
    )
    torch.testing.assert_close(out[1:].float(), sdpa, atol=TOL[dtype][0] * 4, rtol=TOL[dtype][1] * 4)


def test_decode_full_without_tail_or_lead_is_sdpa():
    q, k, v, _, _ = qkv(torch.float32)
    out = decode_full(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    close(out, sdpa, torch.float32)


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_fp8_matches_reference(splits):
    q, k, v, kn, vn = qkv(torch.float32)
    ks, vs = torch.rand(B, HG) + 0.5, torch.rand(B, HG) + 0.5
    k8, v8 = (
        (k / ks[..., None, None]).to(torch.float8_e4m3fn),
        (v / vs[..., None, None]).to(torch.float8_e4m3fn),
    )
    k8 = k8.view(torch.uint8)
    k8[0, 0, 3, 5] = 0x01  # smallest subnormal, 2^-9
    k8[0, 1, 4, 6] = 0x7E  # largest normal, 448
    out = decode_fp8(q, k8, v8, ks, vs, lead=LEAD, k_new=kn, v_new=vn, num_splits=splits)
    close(out, ref.decode_fp8(q, k8, v8, ks, vs, lead=LEAD, k_new=kn, v_new=vn), torch.float32)


def test_decode_compact_masks_empty_slots_and_padding():
    q, k, v, kn, vn = qkv(torch.float16)
    g = torch.Generator().manual_seed(1)
    pos = torch.sort(torch.randperm(300, generator=g)[:N]).values.int().expand(B, HG, N).contiguous()
    pos[1, :, :5] = -1  # empty slots (a row with fewer real tokens than the budget)
    out = decode_compact(q, k, v, pos, k_new=kn, v_new=vn, num_splits=2)
    close(out, ref.decode_compact(q, k, v, pos, k_new=kn, v_new=vn), torch.float16)
    # and it is attention over exactly the kept, non-empty keys
    keep = pos[1, 0] >= 0
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q[1:].float(),
        torch.cat([k[1:, :, keep], kn[1:]], 2).float(),
        torch.cat([v[1:, :, keep], vn[1:]], 2).float(),
        enable_gqa=True,
    )
    torch.testing.assert_close(out[1:].float(), sdpa, atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("bits,d,v_group", [(8, 80, 16), (4, 80, 80), (2, 64, 32)])
def test_decode_quant_matches_reference(bits, d, v_group):
    q, k, v, kn, vn = qkv(torch.float32, n=N, d=d)
    nq, group = 64, 32
    kc, ks, kz = ref.quantize_keys(k[:, :, :nq], bits, group, LEAD)
    vc, vs, vz = ref.quantize_values(v[:, :, :nq], bits, v_group)
    kt, vt = torch.cat([k[:, :, nq:], kn], 2), torch.cat([v[:, :, nq:], vn], 2)  # residual + new token
    out = decode_quant(
        q,
        kc,
        ks,
        kz,
        vc,
        vs,
        vz,
        bits=bits,
        group=group,
        v_group=v_group,
        lead=LEAD,
        k_tail=kt,
        v_tail=vt,
        num_splits=2,
    )
    expect = ref.decode_quant(
        q, kc, ks, kz, vc, vs, vz, bits=bits, group=group, v_group=v_group, lead=LEAD, k_tail=kt, v_tail=vt
    )
    close(out, expect, torch.float32)
    # the quantization error shrinks with bits: int8 is close to unquantized attention
    exact = ref.decode_full(q, k, v, lead=LEAD, k_new=kn, v_new=vn)
    err = (out - exact).abs().max().item()
    assert err < {8: 0.02, 4: 0.3, 2: 1.0}[bits]


def test_decode_quant_fp16_model_dtype():
    q, k, v, kn, vn = qkv(torch.float16, d=64)
    kc, ks, kz = ref.quantize_keys(k[:, :, :64], 4, 16)
    vc, vs, vz = ref.quantize_values(v[:, :, :64], 4, 64)
    out = decode_quant(q, kc, ks, kz, vc, vs, vz, bits=4, group=16, v_group=64, k_tail=kn, v_tail=vn)
    close(
        out,
        ref.decode_quant(q, kc, ks, kz, vc, vs, vz, bits=4, group=16, v_group=64, k_tail=kn, v_tail=vn),
        torch.float16,
    )


@pytest.mark.parametrize("bits,group,v_group", [(8, 32, 16), (4, 24, 80), (2, 16, 20)])
def test_quantize_append_matches_quant_ref_exactly(bits, group, v_group):
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(B, HG, 2 * group, D, generator=g)
    v = torch.randn(B, HG, 2 * group, D, generator=g)
    k[0, 1, :group, 3] = 0.5  # a constant channel: scale 0, code 0
    v[1, 2, 5, :] = 2.0  # a constant token
    lead = torch.tensor([2, group + 3])  # row 1: first key group is all padding, second partly
    out = quantize_append(k, v, bits=bits, group=group, v_group=v_group, lead=lead, start=0)
    kc, ks, kz = ref.quantize_keys(k, bits, group, lead)
    vc, vs, vz = ref.quantize_values(v, bits, v_group)
    for name, expect in zip(
        ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"),
        (kc, ks, kz, vc, vs, vz),
        strict=True,
    ):
        assert out[name].dtype == expect.dtype and out[name].shape == expect.shape, name
        assert torch.equal(out[name], expect), name
    # round trip: dequantized keys within half a step of the input on real tokens
    kd = ref.dequantize_keys(out["k_codes"], out["k_scale"], out["k_zero"], bits, group)
    step = out["k_scale"].float().repeat_interleave(group, 2)
    assert ((kd - k).abs()[0, :, 2:] <= step[0, :, 2:] / 2 + 2e-3).all()


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "quant", "bits": 4, "group": 16, "residual": 16, "v_group": 40},
        {"name": "quant", "bits": 2, "group": 32, "residual": 8},
        {"name": "fp8"},
        {"name": "sink_window", "sinks": 4, "window": 40},
        {"name": "full"},
    ],
)
def test_kernels_read_the_strategy_stores(spec):
    """The kernels agree with the strategies' own reference ``Store.attend`` on real store contents."""
    strat = from_spec(spec)
    q, k, v, kn, vn = qkv(torch.float32)
    store = strat.new_store(batch=B, num_heads=HG, head_dim=D, gqa=G, dtype=torch.float32, device=DEV)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, :6] = False
    store.append(k, v, None, valid)
    expect = store.attend(q, kn, vn, torch.ones(B, 1, dtype=torch.bool), 0.125)
    t = store.tensors()
    lead = getattr(store, "lead", None)
    if spec["name"] == "quant":
        s, lead = strat, store.buf.lead
        out = decode_quant(
            q,
            *(t[n] for n in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")),
            bits=s.bits,
            group=s.group,
            v_group=s.vg(D),
            scale=0.125,
            lead=lead,
            k_tail=torch.cat([t["k_res"], kn], 2),
            v_tail=torch.cat([t["v_res"], vn], 2),
        )
    elif spec["name"] == "fp8":
        out = decode_fp8(
            q, t["k"], t["v"], t["k_scale"], t["v_scale"], scale=0.125, lead=lead, k_new=kn, v_new=vn
        )
    elif spec["name"] == "sink_window":
        out = decode_compact(q, t["k"], t["v"], t["pos"], scale=0.125, k_new=kn, v_new=vn)
    else:
        out = decode_full(q, t["k"], t["v"], scale=0.125, lead=lead, k_new=kn, v_new=vn)
    close(out, expect, torch.float32)


def test_launchers_reject_bad_input():
    q, k, v, _, _ = qkv(torch.float32)
    with pytest.raises(ValueError, match="k: expected"):
        decode_full(q, k[:, :, :, :64], v)
    with pytest.raises(ValueError, match="bits=3"):
        quantize_append(k[:, :, :32], v[:, :, :32], bits=3, group=32, v_group=80)
    with pytest.raises(ValueError, match="group=32"):
        quantize_append(k[:, :, :40], v[:, :, :40], bits=4, group=32, v_group=80)
    with pytest.raises(ValueError, match="pos"):
        decode_compact(q, k, v, None)
    with pytest.raises(ValueError, match="lead"):
        decode_full(q, k, v, lead=torch.zeros(B, dtype=torch.int32))
    with pytest.raises(ValueError, match="one query token"):
        decode_full(torch.cat([q, q], 2), k, v)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_compact_scored_returns_attention_mass(splits):
    from kvcompile.codegen.decode_compact import decode_compact_scored

    q, k, v, kn, vn = qkv(torch.float32)
    pos = torch.arange(N, dtype=torch.int32).expand(B, HG, N).contiguous()
    pos[1, :, :4] = -1
    out, mass = decode_compact_scored(q, k, v, pos, k_new=kn, v_new=vn, num_splits=splits)
    want_out, want_mass = ref.decode_compact_scored(q, k, v, pos, k_new=kn, v_new=vn)
    close(out, want_out, torch.float32)
    torch.testing.assert_close(mass, want_mass, atol=1e-6, rtol=1e-5)
    assert mass.shape == (B, HG, N + 1) and torch.all(mass[1, :, :4] == 0)
    torch.testing.assert_close(mass.sum(-1), torch.full((B, HG), float(G)))  # G query heads, each sums to 1
