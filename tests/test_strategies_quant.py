"""KIVI quantization and fp8 against their papers' formulas (independent reference code here)."""

from __future__ import annotations

import pytest
import torch

from kvcompile.strategies import REGISTRY, reference_attention
from kvcompile.strategies import _quant_ref as qr

B, G, SCALE = 2, 3, 0.125


def store_of(s, hg, d):
    return s.new_store(
        batch=B, num_heads=hg, head_dim=d, gqa=G, dtype=torch.float32, device=torch.device("cpu")
    )


def step(store, q, k, v, valid):
    out = store.attend(q, k, v, valid, SCALE)
    store.append(k, v, q, valid)
    return out


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_layout_and_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 80), generator=g, dtype=torch.uint8)
    packed = qr.pack(codes, bits)
    ppb = 8 // bits
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 80 // ppb)
    assert torch.equal(qr.unpack(packed, bits), codes)
    # byte i = sum_j code[i*ppb + j] << (bits*j): lowest bits hold the first channel
    c, p = codes[0, 0, 0].tolist(), packed[0, 0, 0].tolist()
    for i in range(80 // ppb):
        assert p[i] == sum(c[i * ppb + j] << (bits * j) for j in range(ppb))
    if bits < 8:
        with pytest.raises(ValueError, match="head_dim"):
            qr.pack(codes[..., :79], bits)


def kivi_groups_reference(x, bits, group, axis):
    """Independent KIVI reference: explicit groups via unfold; returns x̂ and per-entry bound."""
    L = (1 << bits) - 1
    xt = x.movedim(axis, -1)  # group along the last axis
    u = xt.unfold(-1, group, group)  # [..., n_groups, group]
    mn, mx = u.amin(-1, keepdim=True), u.amax(-1, keepdim=True)
    s = (mx - mn) / L
    s16, z16 = s.half().float(), mn.half().float()
    code = torch.where(s16 > 0, torch.round((u - z16) / torch.where(s16 > 0, s16, 1)).clamp(0, L), 0)
    xhat = (code * s16 + z16).flatten(-2).movedim(-1, axis)
    bound = (
        (s16 / 2 + L * (s - s16).abs() + (mn - z16).abs() + 1e-6).expand_as(u).flatten(-2).movedim(-1, axis)
    )
    return xhat, bound


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_kivi_group_quantization_error_bound(bits):
    g = torch.Generator().manual_seed(10 + bits)
    x = torch.randn(2, 3, 64, 80, generator=g) * 3 + 1
    kc, ks, kz = qr.quantize_keys(x, bits, group=32)
    assert kc.shape == (2, 3, 64, 80 * bits // 8) and ks.shape == (2, 3, 2, 80) and ks.dtype == torch.float16
    khat = qr.dequantize_keys(kc, ks, kz, bits, 32)
    ref, bound = kivi_groups_reference(x, bits, 32, axis=-2)  # keys: per channel over 32 tokens
    assert ((x - khat).abs() <= bound).all()
    torch.testing.assert_close(khat, ref, atol=1e-5, rtol=0)
    # zero point and scale are the formula's: min and (max - min) / (2^bits - 1) per channel group
    grp = x[0, 1, 32:64, 7]
    assert kz[0, 1, 1, 7].item() == grp.min().half().item()
    assert ks[0, 1, 1, 7].item() == ((grp.max() - grp.min()) / ((1 << bits) - 1)).half().item()

    vc, vs, vz = qr.quantize_values(x, bits, v_group=16)  # values: per token over 16 channels
    assert vs.shape == (2, 3, 64, 5)
    vhat = qr.dequantize_values(vc, vs, vz, bits, 16)
    ref, bound = kivi_groups_reference(x, bits, 16, axis=-1)
    assert ((x - vhat).abs() <= bound).all()
    torch.testing.assert_close(vhat, ref, atol=1e-5, rtol=0)


def test_constant_group_is_exact():
    x = torch.full((1, 1, 32, 8), 0.75)
    c, s, z = qr.quantize_keys(x, 2, 32)
    assert torch.equal(qr.dequantize_keys(c, s, z, 2, 32), x) and (s == 0).all()


def test_quant_store_flushes_and_packs():
    """2-bit, G=16, R=8: Nq = floor(max(0, n-8)/16)*16 after every token; codes packed 4 per byte."""
    s = REGISTRY["quant"](bits=2, group=16, residual=8)
    hg, d, n = 2, 64, 97
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(B, hg, n, d, generator=g), torch.randn(B, hg, n, d, generator=g)
    q = torch.randn(B, hg * G, n, d, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    st = store_of(s, hg, d)
    step(st, q[:, :, :5], k[:, :, :5], v[:, :, :5], valid[:, :5])
    for t in range(5, n):
        step(st, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], valid[:, t : t + 1])
        nq = max(0, t + 1 - 8) // 16 * 16
        tens = st.tensors()
        assert tens["k_res"].shape[2] == t + 1 - nq
        assert (tens["k_codes"].shape[2] if "k_codes" in tens else 0) == nq
        assert 8 <= tens["k_res"].shape[2] < 24 or t + 1 < 8
    tens = st.tensors()
    assert tens["k_codes"].dtype == torch.uint8 and tens["k_codes"].shape == (B, hg, 80, d // 4)
    # KIVI's value groups default to ``group`` channels (here 16: four scale/zero pairs per token)
    assert tens["v_codes"].shape == (B, hg, 80, d // 4) and tens["v_scale"].shape == (B, hg, 80, d // 16)
    assert tens["k_scale"].shape == (B, hg, 5, d) and tens["k_scale"].dtype == torch.float16
    torch.testing.assert_close(tens["k_res"], k[:, :, 80:])  # residual: exact, model dtype
    # the quantized part equals the paper's formula applied to the original tokens
    khat = qr.dequantize_keys(tens["k_codes"], tens["k_scale"], tens["k_zero"], 2, 16)
    ref, bound = kivi_groups_reference(k[:, :, :80], 2, 16, axis=-2)
    assert ((khat - k[:, :, :80]).abs() <= bound).all()
    torch.testing.assert_close(khat, ref, atol=1e-5, rtol=0)
    vhat = qr.dequantize_values(tens["v_codes"], tens["v_scale"], tens["v_zero"], 2, 16)
    ref_v, _ = kivi_groups_reference(v[:, :, :80], 2, 16, axis=-1)
    torch.testing.assert_close(vhat, ref_v, atol=1e-5, rtol=0)
    # attention of the next token = reference attention over (dequantized codes ++ residual ++ new)
    kn, qn = torch.randn(B, hg, 1, d, generator=g), torch.randn(B, hg * G, 1, d, generator=g)
    out = st.attend(qn, kn, kn, torch.ones(B, 1, dtype=torch.bool), SCALE)
    k_all = torch.cat([khat, k[:, :, 80:], kn], 2)
    v_all = torch.cat([vhat, v[:, :, 80:], kn], 2)
    ref_out, _ = reference_attention(qn, k_all, v_all, None, SCALE)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)


def test_quant_prefill_with_left_padding_excludes_pads_from_key_ranges():
    s = REGISTRY["quant"](bits=4, group=16, residual=16)
    hg, d, n, pad = 1, 64, 48, 5
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(B, hg, n, d, generator=g), torch.randn(B, hg, n, d, generator=g)
    k[1, :, :pad] = 1000.0  # padding garbage must not widen the first group's range
    q = torch.randn(B, hg * G, n, d, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :pad] = False
    st = store_of(s, hg, d)
    out = step(st, q, k, v, valid)
    ref, _ = reference_attention(q, k, v, valid[:, None], SCALE, causal_new=n)
    torch.testing.assert_close(out[1, :, pad:], ref[1, :, pad:], atol=1e-5, rtol=1e-4)  # prefill: exact
    ks = st.tensors()["k_scale"]
    real = k[1, 0, pad:16]
    torch.testing.assert_close(ks[1, 0, 0].float(), ((real.amax(0) - real.amin(0)) / 15).half().float())
    # decode: padded slots stay masked, so row 1 equals attention over its real tokens only
    kn, qn = torch.randn(B, hg, 1, d, generator=g), torch.randn(B, hg * G, 1, d, generator=g)
    out = st.attend(qn, kn, kn, torch.ones(B, 1, dtype=torch.bool), SCALE)
    assert out.abs().max() < 100  # the 1000-valued padding keys never contribute


def test_fp8_round_trip_within_e4m3_tolerance_and_clamps_decode():
    s = REGISTRY["fp8"]()
    hg, d, n = 2, 80, 97
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(B, hg, n, d, generator=g) * 4, torch.randn(B, hg, n, d, generator=g)
    q = torch.randn(B, hg * G, n, d, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :7] = False
    k[1, :, :7] = 1e4  # padding must not set the scale
    st = store_of(s, hg, d)
    step(st, q, k, v, valid)
    t = st.tensors()
    assert t["k"].dtype == torch.float8_e4m3fn and t["k"].shape == (B, hg, n, d)
    amax = torch.where(valid[:, None, :, None], k.abs(), 0).amax(dim=(2, 3))
    torch.testing.assert_close(t["k_scale"], amax / 448)
    khat = t["k"].float() * t["k_scale"][:, :, None, None]
    # e4m3: 3 mantissa bits -> relative half-ulp 2^-4; subnormal spacing 2^-9 (times the scale)
    bound = k.abs() / 16 + t["k_scale"][:, :, None, None] * 2.0**-10 + 1e-7
    err = (khat - k).abs()
    assert (err[0] <= bound[0]).all() and (err[1, :, 7:] <= bound[1, :, 7:]).all()
    # a decode token beyond the prefill range saturates at ±448 * scale
    kn = torch.full((B, hg, 1, d), 1e6)
    step(st, q[:, :, :1], kn, kn, torch.ones(B, 1, dtype=torch.bool))
    last = st.tensors()["k"][:, :, -1].float() * st.tensors()["k_scale"][:, :, None]
    torch.testing.assert_close(last, (448 * st.tensors()["k_scale"])[:, :, None].expand(B, hg, d))


@pytest.mark.parametrize("bits,v_bits", [(4, 2), (8, 4), (2, 4)])
def test_asymmetric_key_value_bits_exact_bytes_and_reference(bits, v_bits):
    """K/V bits differ: codes rows are D*bits/8 (keys) and D*v_bits/8 (values); bytes are exact and the
    store's attention equals attention over its own dequantized tensors."""
    s = REGISTRY["quant"](bits=bits, group=16, residual=8, v_bits=v_bits)
    assert s.to_spec()["v_bits"] == v_bits and "v_bits" not in REGISTRY["quant"](bits=4).to_spec()
    assert s.short_label() == f"k{bits}v{v_bits}/g16/r8"
    hg, d, n = 2, 64, 61
    g = torch.Generator().manual_seed(bits * 10 + v_bits)
    k, v = torch.randn(B, hg, n, d, generator=g), torch.randn(B, hg, n, d, generator=g)
    q = torch.randn(B, hg * G, n, d, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    st = store_of(s, hg, d)
    step(st, q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], valid[:, :-1])
    t = st.tensors()
    assert t["k_codes"].shape[-1] == d * bits // 8 and t["v_codes"].shape[-1] == d * v_bits // 8
    assert st.nbytes() == B * hg * s.bytes_for(n - 1, d, 4)
    kd, vd, ok = st.buf.dequant()
    key_ok = torch.cat([ok.expand(B, hg, -1), torch.ones(B, hg, 1, dtype=torch.bool)], 2)
    kk, vv = torch.cat([kd, k[:, :, -1:]], 2), torch.cat([vd, v[:, :, -1:]], 2)
    want = reference_attention(q[:, :, -1:], kk, vv, key_ok, 0.125)[0]
    got = st.attend(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], valid[:, -1:], 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
