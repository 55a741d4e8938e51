"""End-to-end decode throughput: ``model.generate`` tokens/s with a full cache vs compressed plans.

Decode tokens/s = (new_tokens - 1) / (t(new_tokens) - t(1)), so the prefill is not counted. Configs:
transformers' DynamicCache (sdpa), a kvcompile ``full`` plan, and KIVI int4 / a per-head mixed plan
(int4 + int2 + fp8 heads), about 4x smaller than a bf16 cache. Backend: ``triton`` on a CUDA device;
on CPU the runtime's ``torch`` reference (the Triton interpreter is a correctness tool, far too slow
for throughput), labelled as such in the JSON.

    python benchmarks/e2e_decode.py --out benchmarks/results/e2e_decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PLANS = {
    "full": ["full"],
    "int4": [{"name": "quant", "bits": 4, "group": 32, "residual": 32}],
    "mixed_int4_int2_fp8": [
        {"name": "quant", "bits": 4, "group": 32, "residual": 32},
        {"name": "quant", "bits": 2, "group": 32, "residual": 32},
        {"name": "fp8"},
    ],
}


def _generate_time(model, ids, new_tokens, cache_fn, reps):
    best = float("inf")
    for _ in range(reps):
        cache = cache_fn()
        kw = {} if cache is None else {"past_key_values": cache}
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, cache


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from kvcompile.models import load
    from kvcompile.runtime import make_cache, mixed_plan

    cuda = torch.cuda.is_available()
    m = load(args.model, dtype=torch.float16 if cuda else torch.float32)
    model = m.model.to("cuda") if cuda else m.model
    text = "The quick brown fox jumps over the lazy dog while the river keeps flowing. "
    ids = m.tokenizer(text * (args.prompt_tokens // 14 + 1), return_tensors="pt").input_ids[
        :, : args.prompt_tokens
    ]
    ids = ids.repeat(args.batch, 1).to(model.device)
    backend = "triton" if cuda else "torch"
    context = args.prompt_tokens + args.new_tokens
    rows = []
    configs = [("dynamic_cache_sdpa", None)] + [(name, specs) for name, specs in PLANS.items()]
    for name, specs in configs:
        if specs is None:
            model.set_attn_implementation("sdpa")
            cache_fn = lambda: None  # noqa: E731
        else:
            plan = mixed_plan(model, specs, context=context)
            cache_fn = lambda plan=plan: make_cache(plan, model, backend=backend)  # noqa: E731
        t1, _ = _generate_time(model, ids, 1, cache_fn, args.reps)
        tn, cache = _generate_time(model, ids, args.new_tokens, cache_fn, args.reps)
        row = {"config": name, "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / max(tn - t1, 1e-9),
               "generate_s": tn, "prefill_plus_one_s": t1}  # fmt: skip
        if cache is not None:
            row["kv_bytes"] = cache.nbytes()
            row["kv_ratio_vs_model_dtype"] = cache.nbytes() / plan.full_kv_bytes(
                cache.get_seq_length(), args.batch
            )
            bf16 = plan.full_kv_bytes(cache.get_seq_length(), args.batch, dtype="bfloat16")
            row["kv_ratio_vs_bf16"] = cache.nbytes() / bf16
        rows.append(row)
        print(json.dumps(row))
    model.set_attn_implementation("sdpa")
    result = {
        "benchmark": "e2e_decode",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "backend": backend
        if cuda
        else "torch (runtime reference stores; CPU numbers, not kernel performance)",
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "torch_threads": torch.get_num_threads(),
        "results": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
