"""One decode step of the fused KIVI kernel captured in a CUDA graph and replayed (skipped without
CUDA): the replay on new query values equals an eager launch. Decode launchers allocate nothing
that depends on the data, so a serving loop can capture them with static buffers."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="native Triton needs TRITON_INTERPRET unset"),
]


def test_decode_quant_step_replays_in_a_cuda_graph():
    from kvcompile.codegen import reference as ref
    from kvcompile.codegen.decode_quant import decode_quant

    torch.manual_seed(0)
    B, H, G, D, N, dev = 2, 4, 4, 128, 4096, "cuda"
    k, v = torch.randn(B, H, N, D, device=dev), torch.randn(B, H, N, D, device=dev)
    kc, ks, kz = ref.quantize_keys(k, 4, 32)
    vc, vs, vz = ref.quantize_values(v, 4, 32)
    tail_k, tail_v = torch.randn(B, H, 17, D, device=dev).half(), torch.randn(B, H, 17, D, device=dev).half()
    q = torch.randn(B, H * G, 1, D, device=dev).half()
    kw = dict(bits=4, group=32, v_group=32, k_tail=tail_k, v_tail=tail_v)
    decode_quant(q, kc, ks, kz, vc, vs, vz, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_quant(q, kc, ks, kz, vc, vs, vz, **kw)
    q.copy_(torch.randn_like(q))  # the next step's query, written into the captured buffer
    graph.replay()
    torch.cuda.synchronize()
    want = decode_quant(q.clone(), kc, ks, kz, vc, vs, vz, **kw)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(
        out.float(), ref.decode_quant(q, kc, ks, kz, vc, vs, vz, **kw).float(), atol=2e-2, rtol=2e-2
    )
