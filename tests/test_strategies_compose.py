"""ThinK channel pruning, selection+KIVI compositions and MiKV against their defining formulas."""

from __future__ import annotations

import torch

from kvcompile.strategies import REGISTRY, from_spec, reference_attention
from kvcompile.strategies import _quant_ref as qr

B, G, SCALE = 2, 3, 0.125
PAD = 5


def inputs(n, hg, d, seed):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, hg, n, d, generator=g), torch.randn(B, hg, n, d, generator=g)
    q = torch.randn(B, hg * G, n, d, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :PAD] = False
    return q, k, v, valid


def run(s, q, k, v, valid, pre):
    hg, d = k.shape[1], k.shape[3]
    st = s.new_store(
        batch=B, num_heads=hg, head_dim=d, gqa=G, dtype=torch.float32, device=torch.device("cpu")
    )
    for a, b in [(0, pre)] + [(t, t + 1) for t in range(pre, k.shape[2])]:
        sl = slice(a, b)
        out = st.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], valid[:, sl], SCALE)
        st.append(k[:, :, sl], v[:, :, sl], q[:, :, sl], valid[:, sl])
        yield b, st, out


def test_think_keeps_largest_query_key_channel_norms():
    s = REGISTRY["think"](keep_ratio=0.25, obs_window=8)
    hg, d, n, pre = 2, 80, 70, 64
    q, k, v, valid = inputs(n, hg, d, seed=1)
    *_, (t_end, st, out) = run(s, q, k, v, valid, pre)
    t = st.tensors()
    dk = 20
    assert (
        t["k"].shape == (B, hg, n, dk)
        and t["v"].shape == (B, hg, n, d)
        and t["k_channels"].shape == (B, hg, dk)
    )
    for b in range(B):
        real = [i for i in range(pre) if valid[b, i]]
        for h in range(hg):
            qo = q[b, h * G : (h + 1) * G, real[-8:]].reshape(-1, d)  # last 8 real queries, G heads
            score = [qo[:, c].norm().item() * k[b, h, real, c].norm().item() for c in range(d)]
            want = sorted(sorted(range(d), key=lambda c: -score[c])[:dk])
            assert t["k_channels"][b, h].tolist() == want
            torch.testing.assert_close(t["k"][b, h], k[b, h][:, want])
    # the last decode step: past keys seen through the kept channels only, with the original scale
    b, h, tq = 0, 1, n - 1
    ch = t["k_channels"][b, h].long()
    qg = q[b, h * G : (h + 1) * G, tq]  # [G, d]
    s_past = (qg[:, ch] @ k[b, h, :tq][:, ch].T) * SCALE
    s_new = (qg @ k[b, h, tq : tq + 1].T) * SCALE
    p = torch.softmax(torch.cat([s_past, s_new], dim=1), dim=1)
    torch.testing.assert_close(out[b, h * G : (h + 1) * G, 0], p @ v[b, h, : tq + 1], atol=1e-5, rtol=1e-4)


def test_compose_snapkv_then_kivi_codes():
    sel = REGISTRY["snapkv"](budget=24, obs_window=8, pool_kernel=5)
    s = REGISTRY["compose"](select=sel, quant=REGISTRY["quant"](bits=2, group=16, residual=8))
    assert from_spec({"name": "compose", "select": sel.to_spec(), "quant": s.quant.to_spec()}) == s
    hg, d, n, pre = 2, 64, 90, 80
    q, k, v, valid = inputs(n, hg, d, seed=2)
    alone = list(run(sel, q[:, :, :pre], k[:, :, :pre], v[:, :, :pre], valid[:, :pre], pre))[-1][1]
    steps = run(s, q, k, v, valid, pre)
    t_end, st, _ = next(steps)
    t = st.tensors()
    torch.testing.assert_close(t["pos"], alone.tensors()["pos"])  # selection identical to snapkv alone
    *_, (_, st, _) = steps
    t = st.tensors()
    pos = t["pos"].long()
    assert pos.shape == (B, hg, 32 + n - pre) and t["k_codes"].shape == (B, hg, 32, d // 4)
    orig_k = torch.gather(k, 2, pos.clamp(min=0)[..., None].expand(-1, -1, -1, d))
    orig_v = torch.gather(v, 2, pos.clamp(min=0)[..., None].expand(-1, -1, -1, d))
    kc, ks, kz = qr.quantize_keys(orig_k[:, :, :32], 2, 16)  # KIVI of the selected tokens, in order
    assert torch.equal(t["k_codes"], kc) and torch.equal(t["k_scale"], ks)
    torch.testing.assert_close(t["k_res"], orig_k[:, :, 32:])
    assert st.nbytes() == s.bytes_for_seq(pre, n - pre, d, 4) * B * hg
    # attention of one more token over dequantized codes + residual
    kn, qn = torch.randn(B, hg, 1, d), torch.randn(B, hg * G, 1, d)
    out = st.attend(qn, kn, kn, torch.ones(B, 1, dtype=torch.bool), SCALE)
    khat = torch.cat([qr.dequantize_keys(kc, ks, kz, 2, 16), orig_k[:, :, 32:], kn], 2)
    vc, vs, vz = qr.quantize_values(orig_v[:, :, :32], 2, 16)  # KIVI value groups: ``group`` channels
    vhat = torch.cat([qr.dequantize_values(vc, vs, vz, 2, 16), orig_v[:, :, 32:], kn], 2)
    ref, _ = reference_attention(qn, khat, vhat, None, SCALE)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_mikv_keeps_evicted_tokens_at_low_bits():
    sel = REGISTRY["sink_window"](sinks=4, window=12)
    s = REGISTRY["mikv"](select=sel, low_bits=2, group=8)
    hg, d, n, pre = 2, 64, 60, 40
    q, k, v, valid = inputs(n, hg, d, seed=3)
    prev = None
    for t_end, st, out in run(s, q, k, v, valid, pre):
        t = st.tensors()
        if prev is not None:  # attention over hi (exact) + lo (dequantized) + the new token
            hk, hv, hok, lk, lv, lok = prev
            sl = slice(t_end - 1, t_end)
            ka, va = torch.cat([lk, hk, k[:, :, sl]], 2), torch.cat([lv, hv, v[:, :, sl]], 2)
            ok = torch.cat([lok, hok, torch.ones(B, hg, 1, dtype=torch.bool)], 2)
            ref, _ = reference_attention(q[:, :, sl], ka, va, ok, SCALE)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        for b in range(B):
            lead = PAD if b == 1 else 0
            hi = set(range(lead, lead + 4)) | set(range(t_end - 12, t_end))
            lo = set(range(lead, t_end)) - hi
            for h in range(hg):
                assert set(t["pos"][b, h].tolist()) - {-1} == hi
                assert set(t["lo_pos"][b, h].tolist()) - {-1} == lo  # no token left behind
        assert st.nbytes() == s.bytes_for(t_end, d, 4) * B * hg
        lo = st.lo
        lk, lv, lok = lo.dequant()
        lpos = t["lo_pos"].long().clamp(min=0)
        orig = torch.gather(k, 2, lpos[..., None].expand(-1, -1, -1, d))
        nq = lo.nq
        if nq:
            err = (lk[:, :, :nq] - orig[:, :, :nq]).abs() * lok[:, :, :nq, None]
            sc = t["lo_k_scale"].float().repeat_interleave(8, dim=2)
            assert (err <= sc / 2 + 1e-3).all()  # KIVI bound per group (+ fp16 rounding)
            assert t["lo_k_codes"].dtype == torch.uint8 and t["lo_k_codes"].shape[-1] == d // 4
        prev = (t["k"], t["v"], t["pos"] >= 0, lk, lv, lok.expand(B, hg, -1))
