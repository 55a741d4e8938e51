"""End-to-end decode throughput: the full DynamicCache vs kvcompile plans, side by side in one run.

Every config gets its own prefill of the same prompt (untimed), then the configs decode greedily
*round-robin*, one step each in turn, so machine noise hits all of them alike. A config's decode
tokens/s is ``batch * steps / sum(step seconds)``; the JSON also keeps the median step and the
sample count. Configs: transformers' ``DynamicCache`` with sdpa attention (the baseline), kvcompile
``full``, KIVI int4 (KIVI's settings: group 32, residual 32, 4-bit keys and values), a per-head
mixed plan (int4 + int2 + fp8 heads) and the calibrated plan of ``make run``
(``kvcompile compile smollm2-135m --target h100 --context 4096 --kv-budget 0.25``; ``--plan`` reads
it, otherwise it is compiled here for the benchmark's context).

Backend: ``triton`` on a CUDA device; on CPU the runtime's ``cpu`` backend (decode steps through the
C kernels of ``kvcompile.codegen.cpu``: codes read in place, no dequantized copy of the cache).
Both the model and the DynamicCache run in the model's dtype (float32 on CPU, where float16/bfloat16
matmuls are slower); ``kv_ratio_vs_bf16`` states compressed bytes against a bf16 cache as a
deployment would hold it, ``kv_ratio_vs_model_dtype`` against the float32 DynamicCache actually run.
``nbytes_equals_predicted`` checks ``cache.nbytes()`` against ``plan.predicted_kv_bytes(prompt,
decoded=steps)`` after the run.

    OMP_NUM_THREADS=1 python benchmarks/e2e_decode.py --out benchmarks/results/e2e_decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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


def _calibrated(args, context: int) -> Path:
    """The ``make run`` plan: ``--plan`` if given, else compiled now (same flags, this context)."""
    if args.plan is not None:
        return args.plan
    out = Path("out") / f"e2e_{args.model}_ctx{context}.kvplan"
    if not out.exists():
        cmd = [sys.executable, "-m", "kvcompile.cli", "compile", args.model, "--target", "h100",
               "--context", str(context), "--kv-budget", "0.25", "-o", str(out)]  # fmt: skip
        print("compiling the calibrated plan:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt-tokens", type=int, default=4064)
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per config (the samples)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--plan", type=Path, default=None, help="the calibrated plan (default: compile it)")
    p.add_argument("--configs", default="dynamic_cache_sdpa,full,int4,mixed_int4_int2_fp8,calibrated_25pct")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from transformers import DynamicCache

    from kvcompile._compat import cache_kw
    from kvcompile.models import load
    from kvcompile.plan import load as load_plan
    from kvcompile.runtime import make_cache, mixed_plan

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    m = load(args.model, dtype=torch.float16 if cuda else torch.float32)
    model = m.model.to("cuda") if cuda else m.model
    model.eval()
    text = "The quick brown fox jumps over the lazy dog while the river keeps flowing. "
    ids = m.tokenizer(text * (args.prompt_tokens // 14 + 1), return_tensors="pt").input_ids
    ids = ids[:, : args.prompt_tokens].repeat(args.batch, 1).to(model.device)
    backend = "triton" if cuda else "cpu"
    context = args.prompt_tokens + args.new_tokens
    wanted = args.configs.split(",")

    runs: dict[str, dict] = {}
    for name in wanted:
        if name == "dynamic_cache_sdpa":
            plan, make = None, DynamicCache
        elif name == "calibrated_25pct":
            plan = load_plan(_calibrated(args, context))
            make = lambda plan=plan: make_cache(plan, model, backend=backend)  # noqa: E731
        else:
            plan = mixed_plan(model, PLANS[name], context=context)
            make = lambda plan=plan: make_cache(plan, model, backend=backend)  # noqa: E731
        cache = make()
        model.set_attn_implementation("sdpa" if plan is None else "kvcompile")
        _sync(model.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(ids, **cache_kw(cache)).logits[:, -1:]
        _sync(model.device)
        runs[name] = {"plan": plan, "cache": cache, "next": logits.argmax(-1), "steps": [], "tokens": [],
                      "prefill_s": time.perf_counter() - t0}  # fmt: skip
        print(f"{name}: prefill {runs[name]['prefill_s']:.1f}s", flush=True)

    with torch.no_grad():
        for _ in range(args.new_tokens):
            for r in runs.values():
                model.set_attn_implementation("sdpa" if r["plan"] is None else "kvcompile")
                _sync(model.device)
                t0 = time.perf_counter()
                logits = model(r["next"], **cache_kw(r["cache"])).logits[:, -1:]
                r["next"] = logits.argmax(-1)
                _sync(model.device)
                r["steps"].append(time.perf_counter() - t0)
                r["tokens"].append(int(r["next"][0, 0]))
    model.set_attn_implementation("sdpa")

    rows = []
    base = runs.get("dynamic_cache_sdpa")
    for name, r in runs.items():
        steps, cache, plan = r["steps"], r["cache"], r["plan"]
        tps = args.batch * len(steps) / sum(steps)
        row = {"config": name, "decode_tokens_per_s": tps, "median_step_s": statistics.median(steps),
               "steps": len(steps), "prefill_s": r["prefill_s"]}  # fmt: skip
        if base is not None:
            row["speed_vs_dynamic_cache"] = tps / (args.batch * len(base["steps"]) / sum(base["steps"]))
            row["greedy_tokens_equal_dynamic_cache"] = r["tokens"] == base["tokens"]
        if plan is not None:
            seq = cache.get_seq_length()
            row["kv_bytes"] = cache.nbytes()
            row["kv_bytes_predicted"] = plan.predicted_kv_bytes(args.prompt_tokens, args.batch, decoded=len(steps))
            row["nbytes_equals_predicted"] = row["kv_bytes"] == row["kv_bytes_predicted"]
            row["kv_bytes_reserved"] = cache.reserved_nbytes()
            row["kv_ratio_vs_model_dtype"] = cache.nbytes() / plan.full_kv_bytes(seq, args.batch)
            row["kv_ratio_vs_bf16"] = cache.nbytes() / plan.full_kv_bytes(seq, args.batch, dtype="bfloat16")
            row["strategies"] = sorted({s.label() for layer in plan.strategies() for s in layer})[:12]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "strategies"}), flush=True)
    result = {
        "benchmark": "e2e_decode",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "backend": backend if cuda else "cpu (kvcompile.codegen.cpu C kernels; DynamicCache: transformers sdpa)",
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "torch_threads": torch.get_num_threads(),
        "method": "one prefill per config, then decode steps round-robin across configs; tokens/s = steps/sum(step s)",
        "calibrated_plan": None if "calibrated_25pct" not in runs else {
            "content_hash": runs["calibrated_25pct"]["plan"].content_hash,
            "made_by": "kvcompile compile smollm2-135m --target h100 --context 4096 --kv-budget 0.25",
        },  # fmt: skip
        "results": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
