"""Tensor-parallel greedy generation of SmolLM2 with a kvcompile plan, one KV head per rank.

SmolLM2-135M has 3 KV heads and 9 query heads, so with 3 ranks rank ``r`` holds KV head ``r``'s cache
(in the plan's format for that head) and query heads ``3r..3r+2``. Sharding is transformers' own
``tp_plan="auto"``; the per-rank cache is :func:`kvcompile.runtime.distributed.make_rank_cache`.

Run (CPU, gloo)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=3 examples/torchrun_smollm2.py --out out/tp

Options: ``--plan FILE`` (default: a mixed plan, KV heads 0/1/2 = full / KIVI 8-bit / KIVI 4-bit),
``--prompt TEXT``, ``--max-new-tokens N``. Each rank writes ``<out>/rank<r>.json`` with its greedy
tokens, its cache's real bytes and the bytes its sub-plan predicts; rank 0 prints a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from kvcompile import models
from kvcompile._compat import cache_kw
from kvcompile.plan import load as load_plan
from kvcompile.runtime import mixed_plan
from kvcompile.runtime.distributed import RankReport, load_tp_model, make_rank_cache, rank_heads, shard_plan

MIXED = [{"name": "full"}, {"name": "quant", "bits": 8}, {"name": "quant", "bits": 4}]
PROMPT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 3
    + "The pass key is 68142. Remember it. 68142 is the pass key. "
    + "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 2
    + "Question: What is the pass key? Answer with the number. The pass key is"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", help="plan file (default: the built-in mixed plan)")
    ap.add_argument("--model-dir", help="HF checkpoint dir (default: the cached copy of smollm2-135m)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--out", required=True, help="folder for rank<r>.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model_dir = args.model_dir
    if model_dir is None:  # the cached fp32 copy; load() creates it on first use (rank 0 first)
        if rank == 0:
            model_dir = models.load(models.EMBEDDED_DEFAULT).model.config._name_or_path
        box = [model_dir]
        dist.broadcast_object_list(box, src=0)
        model_dir = box[0]
    model = load_tp_model(model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    plan = load_plan(args.plan) if args.plan else mixed_plan(model, MIXED, context=512)
    cache = make_rank_cache(plan, model)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_kw(cache),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
    n = cache.get_seq_length()
    report = RankReport(
        rank=rank,
        world=world,
        kv_heads=rank_heads(plan.model.sites[0].num_kv_heads, world)[rank],
        tokens=out[:, ids.shape[1] :].tolist(),
        cache_nbytes=cache.nbytes(),
        predicted_nbytes=shard_plan(plan, rank, world).predicted_kv_bytes(n, batch=ids.shape[0]),
        seq_length=n,
        bytes_moved=cache.bytes_moved() if hasattr(cache, "bytes_moved") else {},
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(dataclasses.asdict(report)))
    dist.barrier()
    if rank == 0:
        print(f"world {world}: tokens {report.tokens[0]} -> {tok.decode(report.tokens[0])!r}")
        for r in range(world):
            rep = json.loads(Path(args.out, f"rank{r}.json").read_text())
            print(f"rank {r}: KV heads {rep['kv_heads']}, cache {rep['cache_nbytes']} B "
                  f"(sub-plan predicts {rep['predicted_nbytes']} B), moved {rep['bytes_moved']}")  # fmt: skip
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
