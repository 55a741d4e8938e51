"""The ``cpu`` backend's C decode kernels (``kvcompile.codegen.cpu``) against the torch references,
with odd shapes (head_dim 48, GQA 2 and 3, partial groups of padding, empty slots, 2/4/8 bits)."""

from __future__ import annotations

import pytest
import torch

from kvcompile.codegen import cpu
from kvcompile.codegen import reference as ref
from kvcompile.strategies.fp8 import FP8

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the cpu kernels")

CASES = [  # B, H, G, D, nq, nr, v_group, with_pos
    (2, 3, 3, 64, 96, 5, 32, False),
    (1, 2, 2, 48, 64, 0, 16, True),
    (3, 1, 5, 40, 32, 17, 40, True),
]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("case", CASES)
def test_decode_kivi_matches_reference(bits, case):
    B, H, G, D, nq, nr, vg, with_pos = case
    if D % (8 // bits) or vg % (8 // bits):
        pytest.skip("packing")
    torch.manual_seed(bits + nq)
    k, v = torch.randn(B, H, nq, D), torch.randn(B, H, nq, D)
    lead = torch.tensor([3, 0, 40])[:B]
    kc, ks, kz = ref.quantize_keys(k, bits, 32, lead)
    vc, vs, vz = ref.quantize_values(v, bits, vg)
    kr, vr = torch.randn(B, H, nr, D), torch.randn(B, H, nr, D)
    kn, vn, q = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), torch.randn(B, H * G, 1, D)
    pos = None
    if with_pos:
        pos = torch.arange(nq + nr, dtype=torch.int32).expand(B, H, -1).clone()
        pos[:, :, ::7] = -1
    got = cpu.decode_kivi(q, kc, ks, kz, vc, vs, vz, kr, vr, kn, vn, bits=bits, group=32, v_group=vg, nq=nq,
                          scale=0.3, pos=pos, lead=None if with_pos else lead)  # fmt: skip
    kt, vt = torch.cat([kr, kn], 2), torch.cat([vr, vn], 2)
    if pos is None:
        want = ref.decode_quant(q, kc, ks, kz, vc, vs, vz, bits=bits, group=32, v_group=vg, scale=0.3, lead=lead,
                                k_tail=kt, v_tail=vt)  # fmt: skip
    else:
        kd, vd = ref.dequantize_keys(kc, ks, kz, bits, 32), ref.dequantize_values(vc, vs, vz, bits, vg)
        want = ref.decode_compact(q, torch.cat([kd, kr], 2), torch.cat([vd, vr], 2), pos, scale=0.3, k_new=kn,
                                  v_new=vn)  # fmt: skip
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_decode_kivi_reads_only_the_live_slots_of_capacity_buffers():
    B, H, G, D = 1, 2, 3, 64
    k, v = torch.randn(B, H, 64, D), torch.randn(B, H, 64, D)
    kc, ks, kz = ref.quantize_keys(k, 4, 32)
    vc, vs, vz = ref.quantize_values(v, 4, 64)
    pad = lambda t, n: torch.cat([t, torch.full_like(t[:, :, :1], 7).expand(-1, -1, n, -1)], 2)  # noqa: E731
    q, kn, vn, kr = (
        torch.randn(B, H * G, 1, D),
        torch.randn(B, H, 1, D),
        torch.randn(B, H, 1, D),
        torch.zeros(B, H, 0, D),
    )
    a = cpu.decode_kivi(q, kc, ks, kz, vc, vs, vz, kr, kr, kn, vn, bits=4, group=32, v_group=64, nq=32, scale=0.1)
    b = cpu.decode_kivi(q, pad(kc, 64), pad(ks, 2), pad(kz, 2), pad(vc, 64), pad(vs, 64), pad(vz, 64), kr, kr, kn,
                        vn, bits=4, group=32, v_group=64, nq=32, scale=0.1)  # fmt: skip
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_decode_dense_and_fp8_match_references():
    torch.manual_seed(0)
    B, H, G, D, N = 2, 3, 3, 48, 50
    k, v, q = torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H * G, 1, D)
    kn, vn, lead = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), torch.tensor([4, 0])
    want = ref.decode_full(q, k, v, scale=0.2, lead=lead, k_new=kn, v_new=vn)
    torch.testing.assert_close(cpu.decode_dense(q, k, v, kn, vn, scale=0.2, lead=lead), want, atol=2e-5, rtol=1e-5)
    st = FP8().new_store(batch=B, num_heads=H, head_dim=D, gqa=G, dtype=torch.float32, device="cpu")
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[0, :3] = False
    st.append(k, v, None, valid)
    want = st.attend(q, kn, vn, torch.ones(B, 1, dtype=torch.bool), 0.2)
    got = cpu.decode_fp8(q, st.k, st.v, st.k_scale, st.v_scale, kn, vn, scale=0.2, lead=st.lead)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_bad_inputs_are_one_line_errors():
    q = torch.randn(1, 3, 2, 64)  # two query tokens: not a decode step
    k = torch.randn(1, 1, 4, 64)
    with pytest.raises(ValueError, match="one decode token"):
        cpu.decode_dense(q, k, k, k[:, :, :1], k[:, :, :1], scale=1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu.decode_dense(q[:, :, :1].half(), k, k, k[:, :, :1], k[:, :, :1], scale=1.0)
