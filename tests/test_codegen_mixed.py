"""The fused mixed-format launch: one launch for a layer whose KV heads use five different formats
matches the per-group torch references on those heads (CPU interpreter, odd sizes)."""

from __future__ import annotations

import pytest
import torch

from kvcompile.codegen import reference as ref
from kvcompile.codegen.decode_mixed import GroupView, decode_mixed, head_table

B, G, D = 2, 3, 80
LEAD = torch.tensor([0, 6])


def qheads(hs):
    return [h * G + g for h in hs for g in range(G)]


def layer(seed=0):
    """Layer KV heads: 0, 4 -> int4 quant; 1 -> full; 2 -> compact; 3 -> fp8; 5 -> int2 quant."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = r(B, 6 * G, 1, D)
    new_k, new_v = r(B, 6, 1, D), r(B, 6, 1, D)
    groups, refs = [], []

    def quant(heads, bits, nq, nr, vg):
        k, v = r(B, len(heads), nq + nr, D), r(B, len(heads), nq + nr, D)
        kc, ks, kz = ref.quantize_keys(k[:, :, :nq], bits, 32, LEAD)
        vc, vs, vz = ref.quantize_values(v[:, :, :nq], bits, vg)
        t = dict(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz)
        kt = torch.cat([k[:, :, nq:], new_k[:, list(heads)]], 2)
        vt = torch.cat([v[:, :, nq:], new_v[:, list(heads)]], 2)
        groups.append(GroupView("quant", heads, t, bits=bits, group=32, v_group=vg, k_tail=kt, v_tail=vt))
        refs.append(
            (
                heads,
                lambda qq: ref.decode_quant(
                    qq,
                    kc,
                    ks,
                    kz,
                    vc,
                    vs,
                    vz,
                    bits=bits,
                    group=32,
                    v_group=vg,
                    lead=LEAD,
                    k_tail=kt,
                    v_tail=vt,
                ),
            )
        )

    quant((0, 4), 4, 64, 9, 16)
    kf, vf = r(B, 1, 97, D), r(B, 1, 97, D)
    groups.append(GroupView("full", (1,), {"k": kf, "v": vf}, k_tail=new_k[:, [1]], v_tail=new_v[:, [1]]))
    refs.append(
        ((1,), lambda qq: ref.decode_full(qq, kf, vf, lead=LEAD, k_new=new_k[:, [1]], v_new=new_v[:, [1]]))
    )
    kc_, vc_ = r(B, 1, 40, D), r(B, 1, 40, D)
    pos = (torch.arange(40, dtype=torch.int32) * 2 + 1).expand(B, 1, 40).contiguous()
    groups.append(
        GroupView(
            "compact", (2,), {"k": kc_, "v": vc_, "pos": pos}, k_tail=new_k[:, [2]], v_tail=new_v[:, [2]]
        )
    )
    refs.append(
        (
            (2,),
            lambda qq: ref.decode_compact(
                qq, kc_, vc_, pos, lead=LEAD, k_new=new_k[:, [2]], v_new=new_v[:, [2]]
            ),
        )
    )
    k8, v8 = r(B, 1, 50, D).to(torch.float8_e4m3fn), r(B, 1, 50, D).to(torch.float8_e4m3fn)
    s8k, s8v = torch.rand(B, 1, generator=gen) + 0.5, torch.rand(B, 1, generator=gen) + 0.5
    groups.append(
        GroupView(
            "fp8",
            (3,),
            {"k": k8, "v": v8, "k_scale": s8k, "v_scale": s8v},
            k_tail=new_k[:, [3]],
            v_tail=new_v[:, [3]],
        )
    )
    refs.append(
        (
            (3,),
            lambda qq: ref.decode_fp8(
                qq, k8, v8, s8k, s8v, lead=LEAD, k_new=new_k[:, [3]], v_new=new_v[:, [3]]
            ),
        )
    )
    quant((5,), 2, 32, 20, 80)
    return q, groups, refs


@pytest.mark.parametrize("splits", [1, 3])
def test_mixed_layer_matches_per_group_references(splits):
    q, groups, refs = layer()
    out = decode_mixed(q, groups, lead=LEAD, num_splits=splits)
    assert out.shape == q.shape
    for heads, fn in refs:
        torch.testing.assert_close(out[:, qheads(heads)], fn(q[:, qheads(heads)]), atol=2e-5, rtol=2e-5)


def test_mixed_single_group_equals_uniform_kernel():
    from kvcompile.codegen.decode_compact import decode_full

    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(1, 9, 1, 64, generator=gen),
        torch.randn(1, 3, 33, 64, generator=gen),
        torch.randn(1, 3, 33, 64, generator=gen),
    )
    mixed = decode_mixed(q, [GroupView("full", (0, 1, 2), {"k": k, "v": v})])
    torch.testing.assert_close(mixed, decode_full(q, k, v), atol=1e-6, rtol=1e-6)


def test_head_table_and_group_checks():
    t = torch.zeros(1, 1, 4, 8)
    g0 = GroupView("full", (1,), {"k": t, "v": t})
    g1 = GroupView("full", (0,), {"k": t, "v": t})
    assert head_table([g0, g1], 2, torch.device("cpu")).tolist() == [[1, 0], [0, 0]]
    with pytest.raises(ValueError, match="belong to no group"):
        head_table([g0], 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="two groups"):
        head_table([g0, g0], 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="missing tensors"):
        GroupView("quant", (0,), {"k": t})
    with pytest.raises(ValueError, match="fmt="):
        GroupView("int3", (0,), {})
