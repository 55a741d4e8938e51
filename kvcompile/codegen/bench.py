"""``kvcompile bench``: decode-attention kernels per storage format vs torch SDPA and the roofline.

For each (head_dim, context, batch, format) it builds a cache of random keys/values in that format,
times the decode kernel and reports achieved GB/s on the bytes the kernel actually reads (storage
tensors + query + output), the time of torch SDPA over an fp16 cache of the same shape, and the
roofline prediction ``bytes / memory_bandwidth`` of the target (``targets/*.yaml``).

On a CUDA device the Triton kernels run natively (``triton.testing.do_bench``). Without one, a
reduced grid runs on CPU: the kernels under ``TRITON_INTERPRET=1`` (correctness-path timings, not
performance) next to the torch reference of the same format; results are labelled ``"device": "cpu"``.

Example
-------
$ kvcompile bench --out benchmarks/results/decode_attention_cpu.json
$ python benchmarks/decode_attention.py --contexts 1024 32768 --batches 1 8   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

FORMATS = ("full", "fp8", "int8", "int4", "int2", "compact", "mixed")
GPU_GRID = dict(head_dims=(64, 128), contexts=(1024, 4096, 16384, 32768, 131072), batches=(1, 8, 32, 64))
CPU_GRID = dict(head_dims=(64, 128), contexts=(1024, 4096), batches=(1,))
QUANT_GROUP = 32
COMPACT_KEEP = 4  # compact format keeps 1/COMPACT_KEEP of the context (e.g. a window or H2O budget)
MAX_FP16_CACHE_BYTES = 12 << 30  # skip GPU configs whose fp16 cache (+ quantization temporaries): too big


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvcompile bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+")
    p.add_argument("--contexts", type=int, nargs="+")
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default 8 on GPU, 2 on CPU)")
    p.add_argument("--gqa", type=int, default=4, help="query heads per KV head")
    p.add_argument("--target", default=None, help="roofline target (default h100 on GPU, cpu on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions on CPU (default 2)")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    return p


def _ensure_backend() -> str:
    """'cuda' or 'cpu'; on CPU the kernels must be imported under TRITON_INTERPRET=1."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        if any(m.startswith("kvcompile.codegen._common") for m in sys.modules):
            raise RuntimeError(
                "no CUDA device: set TRITON_INTERPRET=1 before kvcompile's kernels are imported"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def _nbytes(*ts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _quant_storage(k, v, bits):
    from . import reference as ref

    kc, ks, kz = ref.quantize_keys(k, bits, QUANT_GROUP)
    vc, vs, vz = ref.quantize_values(v, bits, k.shape[-1])
    return dict(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz)


def build_case(fmt: str, B: int, H: int, G: int, N: int, D: int, device: str, seed: int = 0):
    """(kernel call, torch reference call, bytes the kernel reads) for one format and shape."""
    from . import reference as ref
    from .decode_compact import decode_compact, decode_fp8, decode_full
    from .decode_mixed import GroupView, decode_mixed
    from .decode_quant import decode_quant

    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch.float16 if device == "cuda" else torch.float32
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dt)  # noqa: E731
    q = rnd(B, H * G, 1, D)
    io = _nbytes(q) * 2  # query in, output out
    if fmt == "mixed":  # a per-head plan: half int4, a quarter int2, a quarter fp8 (H >= 4), one launch
        parts = [("int4", max(1, H // 2)), ("int2", max(1, H // 4))]
        parts.append(("fp8", H - sum(n for _, n in parts)))
        views, nbytes, h0 = [], io, 0
        for sub, n in [p for p in parts if p[1] > 0]:
            heads = tuple(range(h0, h0 + n))
            k, v = rnd(B, n, N, D), rnd(B, n, N, D)
            if sub == "fp8":
                t = {
                    "k": k.to(torch.float8_e4m3fn),
                    "v": v.to(torch.float8_e4m3fn),
                    "k_scale": torch.ones(B, n, device=device),
                    "v_scale": torch.ones(B, n, device=device),
                }
                views.append(GroupView("fp8", heads, t))
            else:
                t = _quant_storage(k, v, int(sub[3:]))
                views.append(GroupView("quant", heads, t, bits=int(sub[3:]), group=QUANT_GROUP, v_group=D))
            nbytes += _nbytes(*t.values())
            h0 += n
        return (lambda: decode_mixed(q, views)), None, nbytes
    k, v = rnd(B, H, N, D), rnd(B, H, N, D)
    if fmt == "full":
        k, v = k.half(), v.half()
        return (lambda: decode_full(q, k, v)), (lambda: ref.decode_full(q, k, v)), io + _nbytes(k, v)
    if fmt == "fp8":
        k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
        ks = torch.ones(B, H, device=device)
        return (
            (lambda: decode_fp8(q, k8, v8, ks, ks)), (lambda: ref.decode_fp8(q, k8, v8, ks, ks)),
            io + _nbytes(k8, v8, ks, ks),
        )  # fmt: skip
    if fmt == "compact":
        n = max(1, N // COMPACT_KEEP)
        kc, vc = k[:, :, :n].contiguous(), v[:, :, :n].contiguous()
        pos = torch.arange(N - n, N, device=device, dtype=torch.int32).expand(B, H, n).contiguous()
        return (
            (lambda: decode_compact(q, kc, vc, pos)), (lambda: ref.decode_compact(q, kc, vc, pos)),
            io + _nbytes(kc, vc, pos),
        )  # fmt: skip
    bits = int(fmt[3:])
    t = _quant_storage(k, v, bits)
    args = [t[n] for n in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")]
    kw = dict(bits=bits, group=QUANT_GROUP, v_group=D)
    return (
        (lambda: decode_quant(q, *args, **kw)),
        (lambda: ref.decode_quant(q, *args, **kw)),
        io + _nbytes(*args),
    )


def _time(fn, device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e-3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sdpa_fp16(B, H, G, N, D, device, reps):
    dt = torch.float16 if device == "cuda" else torch.float32  # CPU SDPA in fp16 is not representative
    q = torch.randn(B, H * G, 1, D, device=device, dtype=dt)
    k, v = torch.randn(B, H, N, D, device=device, dtype=dt), torch.randn(B, H, N, D, device=device, dtype=dt)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    return _time(fn, device, reps), _nbytes(q, k, v) + _nbytes(q)


def _measure(fmt, B, H, G, N, D, device, reps, bandwidth) -> dict[str, Any]:
    kernel, reference, nbytes = build_case(fmt, B, H, G, N, D, device)
    t = _time(kernel, device, reps)
    row = {
        "format": fmt, "head_dim": D, "context": N, "batch": B, "kv_heads": H, "gqa": G, "bytes_read": nbytes,
        "time_s": t, "gb_per_s": nbytes / t / 1e9, "roofline_s": nbytes / bandwidth,
        "fraction_of_roofline": (nbytes / bandwidth) / t,
    }  # fmt: skip
    if device == "cpu" and reference is not None:
        row["torch_reference_time_s"] = _time(reference, device, reps)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..targets import load_target

    device = _ensure_backend()
    grid = GPU_GRID if device == "cuda" else CPU_GRID
    head_dims = args.head_dims or grid["head_dims"]
    contexts = args.contexts or grid["contexts"]
    batches = args.batches or grid["batches"]
    H = args.kv_heads or (8 if device == "cuda" else 2)
    G = args.gqa
    reps = args.reps or 2
    target = load_target(args.target or ("h100" if device == "cuda" else "cpu"))
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = []
    for D in head_dims:
        for N in contexts:
            for B in batches:
                if device == "cuda" and 2 * B * H * N * D * 2 > MAX_FP16_CACHE_BYTES:
                    continue
                sdpa_s, sdpa_bytes = _sdpa_fp16(B, H, G, N, D, device, reps)
                for fmt in args.formats:
                    row = _measure(fmt, B, H, G, N, D, device, reps, target.memory_bandwidth)
                    row.update(sdpa_fp16_time_s=sdpa_s, sdpa_fp16_bytes=sdpa_bytes)
                    row["speedup_vs_sdpa_fp16"] = sdpa_s / row["time_s"]
                    rows.append(row)
                    print(
                        f"{fmt:8s} hd={D:3d} N={N:6d} B={B:2d} {row['time_s'] * 1e3:9.3f} ms "
                        f"{row['gb_per_s']:8.3f} GB/s x{row['speedup_vs_sdpa_fp16']:.2f} vs sdpa "
                        f"{row['fraction_of_roofline']:.3f} of roofline"
                    )
    return {
        "benchmark": "decode_attention",
        "device": "cpu" if device == "cpu" else dev_name,
        "kernel_mode": "triton"
        if device == "cuda"
        else "triton-interpret (TRITON_INTERPRET=1, not a perf number)",
        "target": target.spec,
        "target_memory_bandwidth": target.memory_bandwidth,
        "sdpa_baseline_dtype": "float16" if device == "cuda" else "float32 (CPU)",
        "quant_group": QUANT_GROUP,
        "compact_keeps": f"1/{COMPACT_KEEP} of the context",
        "torch": torch.__version__,
        "results": rows,
        "summary": _summary(rows),
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per format: best fraction of roofline, and time per byte of mixed vs the best uniform format."""
    out: dict[str, Any] = {}
    for fmt in {r["format"] for r in rows}:
        rs = [r for r in rows if r["format"] == fmt]
        out[fmt] = {
            "max_gb_per_s": max(r["gb_per_s"] for r in rs),
            "max_fraction_of_roofline": max(r["fraction_of_roofline"] for r in rs),
            "max_speedup_vs_sdpa_fp16": max(r["speedup_vs_sdpa_fp16"] for r in rs),
        }
    mixed = [r for r in rows if r["format"] == "mixed"]
    ratios = []
    for m in mixed:
        where = (m["head_dim"], m["context"], m["batch"])
        same = [
            r for r in rows
            if r["format"] not in ("mixed", "compact") and (r["head_dim"], r["context"], r["batch"]) == where
        ]  # fmt: skip
        if same:
            best = min(r["time_s"] / r["bytes_read"] for r in same)
            ratios.append((m["time_s"] / m["bytes_read"]) / best)
    if ratios:
        out["mixed_time_per_byte_vs_best_uniform"] = {"max": max(ratios), "median": statistics.median(ratios)}
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry (``kvcompile bench``)."""
    args = _parser().parse_args(argv)
    result = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(result, indent=1, default=lambda x: None if math.isnan(x) else x) + "\n"
        )
        print(f"wrote {args.out}")
    return 0
