"""The planner grid's lean KIVI codes (key groups of 64 tokens, one value group per token, no residual):
valid at every planner context, codes equal KIVI's reference quantization, bytes exact, and the
byte saving that makes them candidates (every token in K4V2 under 25 % of the bf16 cache)."""

from __future__ import annotations

import pytest
import torch

from kvcompile.passes.candidates import planner_grid
from kvcompile.strategies import Compose, Quant, SnapKV, reference_attention
from kvcompile.strategies import _quant_ref as qr

B, G, D = 2, 3, 64


def lean(grid):
    def is_lean(q):
        return isinstance(q, Quant) and q.group == 64 and q.v_group == 64 and q.residual == 0
    return [s for s in grid if is_lean(s) or (isinstance(s, Compose) and is_lean(s.quant))]


@pytest.mark.parametrize("context", [512, 1024, 2048, 4096, 32768])
def test_lean_candidates_validate_and_fit_where_g32_codes_do_not(context):
    grid = planner_grid(context)
    found = lean(grid)
    assert {(s.bits, s.vbits) for s in found if isinstance(s, Quant)} == {(4, 4), (4, 2)}
    assert len([s for s in found if isinstance(s, Compose)]) >= 4
    for s in found:
        s.validate_for(head_dim=D, context=context)
    full = 2 * context * D * 2
    k4v2 = next(s for s in found if isinstance(s, Quant) and s.vbits == 2)
    # 4 + 2 code bits + 0.5 + 0.5 bits of fp16 scale/zero per element, over 16 + 16 bits
    assert k4v2.bytes_for(context, D, 2) <= 0.2188 * full + 2 * 63 * D * 2
    if context % 64 == 0:
        assert k4v2.bytes_for(context, D, 2) / full == pytest.approx(3.5 / 16)
    g32 = Quant(bits=4, v_bits=2, group=32)
    assert g32.bytes_for(context, D, 2) > 0.25 * full > k4v2.bytes_for(context, D, 2)
    kept = [s.select.kept(context) for s in found if isinstance(s, Compose)]
    assert max(kept) >= 0.7 * context and min(kept) <= 0.3 * context


@pytest.mark.parametrize("context", [64, 128, 256])
def test_planner_grid_builds_for_short_contexts(context):
    """Compositions whose selection keeps fewer tokens than one quantized group are left out (they were
    a ValueError from ``Compose.check`` below 512 tokens), the rest validate."""
    grid = planner_grid(context)
    assert len(grid) >= 10
    for s in grid:
        if not isinstance(s, Quant) or s.r + s.group <= context:
            s.validate_for(head_dim=D, context=context)


def test_lean_k4v2_codes_bytes_and_attention_against_kivi_reference():
    s = Quant(bits=4, v_bits=2, group=64, v_group=64, residual=0)
    hg, n = 2, 150  # 128 quantized tokens (two key groups) + a partial group of 22 in the model dtype
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(B, hg, n, D, generator=g), torch.randn(B, hg, n, D, generator=g)
    q = torch.randn(B, hg * G, n, D, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    st = s.new_store(batch=B, num_heads=hg, head_dim=D, gqa=G, dtype=torch.float32, device=torch.device("cpu"))
    st.attend(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], valid[:, :-1], 0.125)
    st.append(k[:, :, :-1], v[:, :, :-1], q[:, :, :-1], valid[:, :-1])
    t = st.tensors()
    kc, ks, kz = qr.quantize_keys(k[:, :, :128], 4, 64)
    vc, vs, vz = qr.quantize_values(v[:, :, :128], 2, 64)
    assert torch.equal(t["k_codes"][:, :, :128], kc) and torch.equal(t["v_codes"][:, :, :128], vc)
    assert ks.shape[2] == 2 and vs.shape[-1] == 1  # two key groups; one value group per token
    assert st.nbytes() == B * hg * s.bytes_for(n - 1, D, 4)
    assert s.bytes_for(n - 1, D, 4) == 128 * D * 6 // 8 + 2 * D * 4 + 128 * 4 + 21 * 2 * D * 4
    khat = torch.cat([qr.dequantize_keys(kc, ks, kz, 4, 64), k[:, :, 128:]], 2)
    vhat = torch.cat([qr.dequantize_values(vc, vs, vz, 2, 64), v[:, :, 128:]], 2)
    want = reference_attention(q[:, :, -1:], khat, vhat, None, 0.125)[0]
    got = st.attend(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], valid[:, -1:], 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lean_selection_composition_keeps_its_budget_with_exact_bytes():
    s = Compose(select=SnapKV(budget=96, obs_window=32), quant=Quant(bits=4, group=64, v_group=64, residual=0))
    hg, n = 1, 300
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(B, hg, n, D, generator=g), torch.randn(B, hg, n, D, generator=g)
    q = torch.randn(B, hg * G, n, D, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    st = s.new_store(batch=B, num_heads=hg, head_dim=D, gqa=G, dtype=torch.float32, device=torch.device("cpu"))
    st.attend(q, k, v, valid, 0.125)
    st.append(k, v, q, valid)
    assert st.nbytes() == B * hg * s.bytes_for(n, D, 4)
    assert st.tensors()["pos"].shape[-1] == 128  # budget + observation window, 128 = two key groups


@pytest.mark.slow
def test_lean_plan_decodes_alike_on_every_cpu_backend_with_predicted_bytes(smol):
    """A plan mixing the lean K4V2 codes, a 3/4 selection under lean 4-bit codes and fp8 per head runs a
    prefill past two key groups and decode steps: the C and Triton (interpreted) decode kernels give the
    torch reference's logits and the cache holds what the plan predicts."""
    from kvcompile._compat import cache_kw
    from kvcompile.runtime import make_cache, mixed_plan

    model = smol.model
    grid = planner_grid(256)
    specs = [next(s for s in lean(grid) if isinstance(s, Quant) and s.vbits == 2).to_spec(),
             max((s for s in lean(grid) if isinstance(s, Compose)), key=lambda s: s.select.kept(256)).to_spec(),
             {"name": "fp8"}]
    plan = mixed_plan(model, specs, context=256)
    ids = torch.randint(100, 5000, (1, 200), generator=torch.Generator().manual_seed(0))
    logits = {}
    for backend in ("torch", "cpu", "triton-interpret"):
        cache = make_cache(plan, model, backend=backend)
        with torch.no_grad():
            out = [model(ids, **cache_kw(cache)).logits[:, -1]]
            for t in range(3):
                out.append(model(ids[:, t:t + 1], **cache_kw(cache)).logits[:, -1])
        assert cache.nbytes() == plan.predicted_kv_bytes(200, decoded=3)
        logits[backend] = torch.cat(out)
    for backend in ("cpu", "triton-interpret"):
        torch.testing.assert_close(logits[backend], logits["torch"], atol=2e-4, rtol=1e-4)
