"""GPU (CUDA) checks of the kernels at real sizes; skipped without a CUDA device (see conftest).

Run on a GPU machine without TRITON_INTERPRET: ``TRITON_INTERPRET=0 pytest -m gpu tests/test_codegen_gpu.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvcompile._compat import cache_kw
from kvcompile.codegen import bench
from kvcompile.codegen import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="native Triton needs TRITON_INTERPRET=0"
    ),
]

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("fmt", [f for f in bench.FORMATS if f != "mixed"])
@pytest.mark.parametrize("D,N,B", [(128, 32768, 4), (64, 4097, 16), (80, 97, 3)])
def test_kernels_match_reference_at_real_sizes(fmt, D, N, B):
    kernel, reference, _ = bench.build_case(fmt, B, 8, 4, N, D, "cuda")
    atol, rtol = TOL[torch.float16]
    torch.testing.assert_close(kernel().float(), reference().float(), atol=atol, rtol=rtol)


def test_mixed_layer_matches_per_group_references_on_gpu():
    from kvcompile.codegen.decode_mixed import GroupView, decode_mixed

    torch.manual_seed(0)
    B, G, D, N = 4, 4, 128, 8192
    dev = "cuda"
    q = torch.randn(B, 4 * G, 1, D, device=dev, dtype=torch.float16)
    k, v = torch.randn(B, 2, N, D, device=dev), torch.randn(B, 2, N, D, device=dev)
    kc, ks, kz = ref.quantize_keys(k, 4, 32)
    vc, vs, vz = ref.quantize_values(v, 4, D)
    qt = dict(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz)
    kf, vf = torch.randn(B, 2, N // 3, D, device=dev).half(), torch.randn(B, 2, N // 3, D, device=dev).half()
    out = decode_mixed(q, [GroupView("quant", (0, 2), qt, bits=4, group=32, v_group=D),
                           GroupView("full", (1, 3), {"k": kf, "v": vf})])  # fmt: skip
    rows = lambda hs: [h * G + j for h in hs for j in range(G)]  # noqa: E731
    want_q = ref.decode_quant(q[:, rows((0, 2))], kc, ks, kz, vc, vs, vz, bits=4, group=32, v_group=D)
    want_f = ref.decode_full(q[:, rows((1, 3))], kf, vf)
    torch.testing.assert_close(out[:, rows((0, 2))].float(), want_q.float(), atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(out[:, rows((1, 3))].float(), want_f.float(), atol=4e-3, rtol=4e-3)


def test_int4_decode_beats_fp16_sdpa_at_32k_and_mixed_costs_what_its_bytes_cost(tmp_path):
    """Loose performance floor (the issue's goals: >= 3x SDPA, >= 80 % of HBM bandwidth, mixed within
    10 % per byte, are reported by benchmarks/decode_attention.py)."""
    args = bench._parser().parse_args(["--head-dims", "128", "--contexts", "32768", "--batches", "8",
                                       "--formats", "full", "int4", "int2", "fp8", "mixed"])  # fmt: skip
    res = bench.run(args)
    rows = {r["format"]: r for r in res["results"]}
    assert rows["int4"]["speedup_vs_sdpa_fp16"] > 1.5
    assert rows["int4"]["fraction_of_roofline"] > 0.3
    assert res["summary"]["mixed_time_per_byte_vs_best_uniform"]["max"] < 1.5


@pytest.mark.slow
def test_smollm2_triton_backend_validate_equals_torch(smol):
    from kvcompile.runtime import make_cache, mixed_plan
    from kvcompile.runtime.interpreter import attach

    model, tok = smol.model.cuda(), smol.tokenizer
    try:
        prompt = "The pass key is 71432. Remember it. Question: What is the pass key? Answer with the number."
        ids = tok(prompt + " The pass key is", return_tensors="pt").input_ids.cuda()
        specs = [{"name": "quant", "bits": 4, "group": 8, "residual": 8}, "fp8", {"name": "snapkv"}]
        plan = mixed_plan(model, specs, context=512)
        tokens = {}
        for backend in ("torch", "triton"):
            cache = make_cache(plan, model, backend=backend)
            interp = attach(cache, validate=True) if backend == "triton" else None
            out = model.generate(ids, **cache_kw(cache), max_new_tokens=16, do_sample=False)
            tokens[backend] = out[0, ids.shape[1] :].tolist()
        assert tokens["triton"] == tokens["torch"]
        assert interp.errors["attend_decode"] < 1e-3 and interp.errors["flush_quant"] == 0.0
    finally:
        model.set_attn_implementation("sdpa")
        smol.model.cpu()
