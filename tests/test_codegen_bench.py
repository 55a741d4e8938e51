"""The decode-attention benchmark runs on CPU (interpreter) and measures kernels that are correct."""

from __future__ import annotations

import json

import pytest
import torch

from kvcompile.codegen import bench


@pytest.mark.parametrize("fmt", [f for f in bench.FORMATS if f != "mixed"])
def test_benchmark_cases_compute_their_reference(fmt):
    kernel, reference, nbytes = bench.build_case(fmt, 1, 2, 4, 96, 64, "cpu")
    torch.testing.assert_close(kernel(), reference(), atol=2e-5, rtol=2e-5)
    assert nbytes > 0


def test_bench_cli_writes_labelled_results(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--head-dims", "64", "--contexts", "64", "--formats", "full", "int4", "mixed", "--reps", "1"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["target"] == "cpu" and "interpret" in res["kernel_mode"]
    rows = {r["format"]: r for r in res["results"]}
    assert set(rows) == {"full", "int4", "mixed"}
    # bytes actually read: int4 codes + scales are far fewer than the fp16 cache of the same shape
    assert rows["int4"]["bytes_read"] < rows["full"]["bytes_read"] / 2
    for r in rows.values():
        assert r["gb_per_s"] == pytest.approx(r["bytes_read"] / r["time_s"] / 1e9)
        assert r["roofline_s"] == pytest.approx(r["bytes_read"] / res["target_memory_bandwidth"])
    assert "mixed_time_per_byte_vs_best_uniform" in res["summary"]
