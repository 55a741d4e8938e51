"""Uniform-strategy benchmark: every library strategy on SmolLM2 at KV budgets of 50/25/12.5 % of full.

For each *cell* (one strategy spec for every KV head of every layer) this runs the eval tasks of
``kvcompile.eval`` — passkey at 1k/2k/4k, multi-key NIAH at 2k, perplexity of 512 tokens after 3.5k
tokens of context — question-agnostic (the context is compressed before the question is seen), and
records accuracy, ppl, the real KV bytes held (``cache.nbytes()``) relative to a full fp32 cache of
the same tokens, and wall time. Writes ``benchmarks/results/uniform_strategies.json``.

Budgets. Token-selection strategies (sink_window, heavy_hitter, snapkv) get, per sample, the token
budget whose exact bytes (``strategy.bytes_for_seq(prefill, decoded)``) come closest to the budget
fraction of the full cache's bytes for that sample's tokens. Strategies whose bytes are fixed by their
format (full bf16, fp8, quant 8/4/2, think) are reported at their own ratio. "Full bytes" = the
model's own dtype (fp32); ``kv_ratio_vs_bf16`` is also reported.

Shared prefill (why it is exact). By the Store contract (``strategies/base.py``) the attention of a
forward's new tokens is computed over the store *plus the new tokens in full precision*, so a
context prefill produces the same hidden states whatever the strategy; only what is *kept* differs.
Each sample's context is therefore run through the model once while recording every layer's
post-RoPE (q, k, v) and attention mask; each cell then replays exactly the runtime's own per-layer
calls — ``cache.update(k, v, layer)`` followed by the registered ``"kvcompile"`` attention function —
into a fresh ``plan.make_cache(model)``, checks the replayed attention output against the recorded
one (``replay_max_abs_diff``), and continues with the question / scored tokens through the real
model. ``replay_check`` in the JSON compares this against the plain path (``generate_answer`` /
``sample_nll``) for a few cells.

Usage (one core, a few tens of minutes)::

    OMP_NUM_THREADS=1 python benchmarks/uniform_strategies.py [--samples 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvcompile.eval import data as evdata
from kvcompile.eval import tasks as evtasks
from kvcompile.models import load
from kvcompile.runtime import make_cache, uniform_plan
from kvcompile.runtime.attention import kvcompile_attention
from kvcompile.strategies import from_spec

RESULTS = Path(__file__).parent / "results" / "uniform_strategies.json"
BUDGETS = (0.5, 0.25, 0.125)
MAX_NEW = 10
RECORD = "kvcompile_eval_record"


# ---- cells --------------------------------------------------------------------------------------
def _sink(n: int) -> dict[str, Any]:
    return {"name": "sink_window", "sinks": 4, "window": max(1, n - 4)}


def _h2o(n: int) -> dict[str, Any]:
    return {"name": "heavy_hitter", "budget": n, "recent": n // 2}


def _snap(n: int) -> dict[str, Any]:
    obs = max(1, min(32, n // 4))
    return {"name": "snapkv", "budget": max(1, n - obs), "obs_window": obs}


FIXED: dict[str, dict[str, Any] | None] = {
    "dynamic": None,  # transformers' DynamicCache: the uncompressed reference
    "full": {"name": "full"},
    "full-bf16": {"name": "full", "dtype": "bfloat16"},
    "fp8": {"name": "fp8"},
    "quant8": {"name": "quant", "bits": 8, "group": 32},
    "quant4": {"name": "quant", "bits": 4, "group": 32},
    "quant2": {"name": "quant", "bits": 2, "group": 32},
    "think-0.5": {"name": "think", "keep_ratio": 0.5},
    "think-0.25": {"name": "think", "keep_ratio": 0.25},
}
FAMILIES: dict[str, Callable[[int], dict[str, Any]]] = {
    "sink_window": _sink,
    "heavy_hitter": _h2o,
    "snapkv": _snap,
}


def cell_names() -> list[str]:
    return list(FIXED) + [f"{fam}@{b}" for b in BUDGETS for fam in FAMILIES]


def sized_spec(family: str, frac: float, prefill: int, decoded: int, head_dim: int, dtype_bytes: int) -> dict:
    """The family's spec whose exact bytes after ``prefill`` + ``decoded`` tokens are closest to
    ``frac`` of a full cache (bisection on the token budget; bytes grow with it)."""
    make = FAMILIES[family]
    target = frac * 2 * head_dim * dtype_bytes * (prefill + decoded)

    def size(n: int) -> int:
        return from_spec(make(n)).bytes_for_seq(prefill, decoded, head_dim, dtype_bytes)

    lo, hi = 8, prefill - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    best = min((lo, min(lo + 1, prefill - 1)), key=lambda n: abs(size(n) - target))
    return make(best)


def cell_spec(cell: str, sample: evdata.Sample, decoded: int) -> dict[str, Any] | None:
    if cell in FIXED:
        return FIXED[cell]
    family, frac = cell.split("@")
    return sized_spec(
        family, float(frac), sample.context_len, sample.length - sample.context_len + decoded, 64, 4
    )


# ---- record once, replay per cell ----------------------------------------------------------------
class Recorder:
    """Registers an attention function that runs sdpa and records each layer's inputs and output."""

    def __init__(self) -> None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface

        self.calls: list[tuple[Any, ...]] = []
        self.active = False  # outside prefill() the function is plain sdpa

        def record(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
            out = sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout, scaling, **kwargs
            )
            if self.active:
                self.calls.append((module, query, key, value, attention_mask, scaling, out[0]))
            return out

        AttentionInterface.register(RECORD, record)
        AttentionMaskInterface.register(RECORD, sdpa_mask)

    @torch.no_grad()
    def prefill(self, model: torch.nn.Module, sample: evdata.Sample) -> tuple[Any, torch.Tensor]:
        """DynamicCache prefill of the sample's context; returns (that cache, last logits)."""
        from transformers import DynamicCache

        self.calls = []
        model.set_attn_implementation(RECORD)
        cache = DynamicCache(config=model.config)
        self.active = True
        try:
            logits = evtasks.prefill_context(model, sample, cache)
        finally:
            self.active = False
        if len(self.calls) != model.config.num_hidden_layers:
            raise RuntimeError(f"recorded {len(self.calls)} attention calls, expected one per layer")
        return cache, logits

    @torch.no_grad()
    def replay(self, cache: Any) -> float:
        """Feed the recorded prefill into a KVCompileCache exactly as the model's forward would."""
        worst = 0.0
        for layer, (module, q, k, v, mask, scaling, ref) in enumerate(self.calls):
            k2, v2 = cache.update(k, v, layer)
            out, _ = kvcompile_attention(module, q, k2, v2, mask, scaling=scaling)
            worst = max(worst, (out.float() - ref.float()).abs().max().item())
        return worst


# ---- one sample, all cells ------------------------------------------------------------------------
def run_sample(model, tok, rec: Recorder, sample: evdata.Sample, cells: list[str], kind: str, chunk: int):
    """Returns {cell: result dict} for one sample (kind: "retrieval" or "ppl")."""
    t0 = time.perf_counter()
    dyn, logits = rec.prefill(model, sample)
    shared = time.perf_counter() - t0
    out: dict[str, dict[str, Any]] = {}
    decoded = MAX_NEW - 1 if kind == "retrieval" else 0
    per_tok = evtasks.full_bytes_per_token(model)
    for cell in cells:
        t1 = time.perf_counter()
        spec = cell_spec(cell, sample, decoded)
        if spec is None:
            cache, diff = dyn, 0.0
        else:
            plan = uniform_plan(model, spec, context=sample.length + MAX_NEW)
            cache = make_cache(plan, model)
            diff = rec.replay(cache)
        if kind == "retrieval":
            text, tokens = evtasks.continue_answer(model, tok, sample, cache, max_new_tokens=MAX_NEW)
            res = {"generated": text, "correct": evdata.is_correct(text, sample.answer)}
        else:
            nll, n = evtasks.continuation_nll(model, sample, cache, logits, chunk=chunk)
            tokens = sample.length - 1
            res = {"nll": nll, "scored": n}
        b = evtasks.cache_nbytes(cache)
        res.update(
            spec=spec,
            kv_bytes=b,
            full_kv_bytes=per_tok * tokens,
            tokens=tokens,
            replay_max_abs_diff=diff,
            wall_s=time.perf_counter() - t1 + shared,  # the shared prefill is charged to every cell
        )
        out[cell] = res
    return out


def aggregate(
    task: str, length: int, per_sample: list[dict[str, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    cells: dict[str, dict[str, Any]] = {}
    for cell in per_sample[0]:
        rows = [s[cell] for s in per_sample]
        r: dict[str, Any] = {
            "task": task,
            "length": length,
            "n": len(rows),
            "kv_bytes": sum(x["kv_bytes"] for x in rows) / len(rows),
            "full_kv_bytes": sum(x["full_kv_bytes"] for x in rows) / len(rows),
            "wall_s": sum(x["wall_s"] for x in rows),
            "replay_max_abs_diff": max(x["replay_max_abs_diff"] for x in rows),
            "specs": [x["spec"] for x in rows],
        }
        r["kv_ratio"] = r["kv_bytes"] / r["full_kv_bytes"]
        r["kv_ratio_vs_bf16"] = 2 * r["kv_ratio"]
        if task == "ppl":
            r["ppl"] = math.exp(sum(x["nll"] for x in rows) / sum(x["scored"] for x in rows))
            r["accuracy"] = None
        else:
            r["accuracy"] = sum(x["correct"] for x in rows) / len(rows)
            r["ppl"] = None
            r["generated"] = [x["generated"] for x in rows]
        cells[cell] = r
    return cells


# ---- replay check ------------------------------------------------------------------------------
def replay_check(model, tok, rec: Recorder, cells: list[str], length: int) -> list[dict[str, Any]]:
    """The shared-prefill path must equal the plain path (own prefill through the runtime)."""
    sample = evdata.make_passkey_sample(tok, length, seed=99, depth=0.5)
    fast = run_sample(model, tok, rec, sample, cells, "retrieval", 32)
    rows = []
    for cell in cells:
        spec = fast[cell]["spec"]
        cache = make_cache(uniform_plan(model, spec, context=sample.length + MAX_NEW), model)
        text, _ = evtasks.generate_answer(model, tok, sample, cache, max_new_tokens=MAX_NEW)
        rows.append(
            {
                "cell": cell,
                "spec": spec,
                "plain": text,
                "shared_prefill": fast[cell]["generated"],
                "plain_kv_bytes": cache.nbytes(),
                "shared_kv_bytes": fast[cell]["kv_bytes"],
                "equal": text == fast[cell]["generated"] and cache.nbytes() == fast[cell]["kv_bytes"],
            }
        )
        print(f"replay check {cell}: {rows[-1]['equal']}", file=sys.stderr, flush=True)
    return rows


# ---- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2, help="passkey samples per length and niah samples")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--niah-length", type=int, default=2048)
    p.add_argument("--ppl-context", type=int, default=3584)
    p.add_argument("--ppl-target", type=int, default=512)
    p.add_argument("--ppl-chunk", type=int, default=32)
    p.add_argument("--cells", default=",".join(cell_names()))
    p.add_argument("--skip-check", action="store_true")
    p.add_argument(
        "--question-aware",
        action="store_true",
        help="compress after the question (prefill all but the last prompt token); adds a "
        "'question_aware' section to an existing --out file; ppl (no question) is skipped",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cells = args.cells.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    loaded = load("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    rec = Recorder()
    # cheapest first; the 4k passkey block last so a cut-off run still has every other task
    ppl_len = args.ppl_context + args.ppl_target
    blocks = [("passkey", n) for n in lengths if n <= 2048] + [("niah", args.niah_length), ("ppl", ppl_len)]
    blocks += [("passkey", n) for n in lengths if n > 2048]
    if args.question_aware:
        blocks = [b for b in blocks if b[0] != "ppl"]
    doc: dict[str, Any] = {
        "benchmark": "uniform strategies, question-agnostic, SmolLM2-135M-Instruct (fp32)",
        "incomplete": "running: blocks finish in the order listed in config.blocks",
        "config": {
            "cells": cells,
            "budgets": list(BUDGETS),
            "blocks": [f"{t}@{n}" for t, n in blocks],
            "passkey_samples_per_length": args.samples,
            "niah_samples": args.samples,
            "niah_needles": 4,
            "ppl_windows": 1,
            "ppl_context": args.ppl_context,
            "ppl_target": args.ppl_target,
            "ppl_chunk": args.ppl_chunk,
            "max_new_tokens": MAX_NEW,
            "decoding": "greedy",
            "setting": "question-agnostic (context compressed before the question is seen)",
            "full_bytes": "fp32 (the model dtype); kv_ratio_vs_bf16 = 2 * kv_ratio",
            "sample_counts_note": "small sample counts because the machine is 2 CPU cores shared with "
            "other jobs; accuracies are over n samples (see n) and are coarse",
        },
        "source": evdata.source_info(),
        "machine": evtasks.machine_info(),
        "results": {},
    }
    section = doc
    if args.question_aware:
        section = {
            "setting": "question-aware: everything but the prompt's last token is prefilled (and compressed) "
            "in one forward, so SnapKV/H2O observe the question",
            "incomplete": doc["incomplete"],
            "config": {**doc["config"], "setting": "question-aware"},
            "results": {},
        }
        doc = json.loads(args.out.read_text())
        doc["question_aware"] = section
    if not args.skip_check and not args.question_aware:
        doc["replay_check"] = replay_check(
            model, tok, rec, ["quant2", "heavy_hitter@0.25", "snapkv@0.125", "think-0.25"], min(lengths)
        )
        _write(args.out, doc)
    t_all = time.perf_counter()
    for task, length in blocks:
        t0 = time.perf_counter()
        if task == "ppl":
            samples = [evdata.make_ppl_sample(tok, args.ppl_context, args.ppl_target, seed=0)]
            kind = "ppl"
        elif task == "niah":
            samples = [evdata.make_niah_sample(tok, length, seed=i, needles=4) for i in range(args.samples)]
            kind = "retrieval"
        else:
            samples = evtasks.passkey_samples(tok, length, args.samples, seed=0)
            kind = "retrieval"
        if args.question_aware:
            samples = [dataclasses.replace(x, context_len=x.length - 1) for x in samples]
        per_sample = [run_sample(model, tok, rec, s, cells, kind, args.ppl_chunk) for s in samples]
        for cell, r in aggregate(task, length, per_sample).items():
            section["results"].setdefault(cell, {})[f"{task}@{length}"] = r
        print(f"{task}@{length}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        section["wall_s"] = time.perf_counter() - t_all
        _write(args.out, doc)
    section.pop("incomplete")
    _write(args.out, doc)
    print(table(section))
    return 0


def table(doc: dict[str, Any]) -> str:
    """Cells x blocks: accuracy (passkey/niah) or ppl; the KV ratio measured in the ppl block (4k)."""
    blocks = doc["config"]["blocks"]
    head = ["cell", *blocks, "kv_ratio", "wall_s"]
    rows = [head]
    for cell, res in doc["results"].items():
        row = [cell]
        for b in blocks:
            r = res.get(b)
            row.append(
                "-" if r is None else f"{r['ppl']:.3f}" if r["ppl"] is not None else f"{r['accuracy']:.2f}"
            )
        ratio = next((r["kv_ratio"] for k, r in res.items() if k.startswith("ppl")), None)
        row.append("-" if ratio is None else f"{ratio:.3f}")
        row.append(f"{sum(r['wall_s'] for r in res.values()):.0f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
