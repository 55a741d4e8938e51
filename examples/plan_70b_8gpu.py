"""Plan Llama-3-70B for a node of 8 H100-SXM GPUs from its config alone (meta device, no weights).

Run: ``python examples/plan_70b_8gpu.py [OUT.kvplan]`` (about 10 s on a laptop CPU).
"""

from __future__ import annotations

import sys
import time

import kvcompile
from kvcompile.report import render_inspect

# Llama-3-70B: 80 layers x 8 KV heads x head_dim 128, K and V, 2 bytes (bf16)
FULL_BF16_BYTES_PER_TOKEN = 2 * 80 * 8 * 128 * 2


def main(out: str = "out/llama-3-70b_h100x8.kvplan") -> int:
    t0 = time.perf_counter()
    plan = kvcompile.optimize("llama-3-70b", target="h100-sxm:8", context=8192, batch=16, progress=False)
    plan.save(out)
    print(render_inspect(plan))
    per_token = plan.predicted["full_bf16_kv_bytes_per_token"]
    print(f"\nfull bf16 KV bytes/token: {per_token} (expected {FULL_BF16_BYTES_PER_TOKEN})")
    print(f"compiled and saved {out} in {time.perf_counter() - t0:.1f} s")
    return 0 if per_token == FULL_BF16_BYTES_PER_TOKEN else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
