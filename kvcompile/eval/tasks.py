"""Evaluation tasks on a real model with any KV cache: passkey, multi-key needle retrieval, perplexity.

A *cache factory* decides which cache a sample runs with: ``factory(model, tokens) -> Cache | None``
where ``tokens`` is the number of tokens the sample will push through the cache (factories for
token-budget strategies may size their budget from it; a plan's factory ignores it). ``None`` means
transformers' own ``DynamicCache`` — the uncompressed reference. :func:`as_cache_factory` turns a
Plan, a plan path, ``None`` or a callable into one.

Question-agnostic by default: the context (haystack) is prefilled into the cache *before* the
question is seen — ``model(ids[:, :context_len], cache=cache)`` — then ``model.generate``
continues from the full prompt on top of the compressed context, so strategies that score tokens at
prefill (SnapKV, H2O) cannot peek at the question. ``question_aware=True`` runs one prefill of the
whole prompt instead.

Example
-------
>>> from kvcompile.models import load                                   # doctest: +SKIP
>>> res = evaluate(None, load("smollm2-135m"), tasks=("passkey",), lengths=(1024,))  # doctest: +SKIP
>>> res["results"][0]["accuracy"]                                       # doctest: +SKIP
1.0
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from .._compat import cache_kw
from ..runtime import make_cache
from .data import Sample, is_correct, make_niah_sample, make_passkey_sample, make_ppl_sample, source_info

CacheFactory = Callable[[torch.nn.Module, int], Any]
SUITE_TASKS = ("single", "multi", "twohop", "followup", "lm")  # kvcompile.eval.suite families
DEFAULT_TASKS = ("passkey", "niah", "ppl")
TASKS = (*DEFAULT_TASKS, *SUITE_TASKS)


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One task at one length. ``accuracy`` for retrieval tasks, ``ppl`` for perplexity (else None).

    ``kv_bytes``: mean bytes the cache held at the end of a sample (``cache.nbytes()``, or the
    tensors of a ``DynamicCache``); ``full_kv_bytes``: what an uncompressed cache in the model dtype
    holds for the same tokens; ``tokens``: mean tokens pushed through the cache per sample.
    """

    task: str
    length: int
    n: int
    accuracy: float | None
    ppl: float | None
    wall_s: float
    kv_bytes: float | None
    full_kv_bytes: float
    tokens: float
    details: list[dict[str, Any]]

    @property
    def kv_ratio(self) -> float | None:
        return None if self.kv_bytes is None else self.kv_bytes / self.full_kv_bytes

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kv_ratio"] = self.kv_ratio
        return d


# ---- caches -----------------------------------------------------------------------------------------
def as_cache_factory(obj: Any) -> CacheFactory:
    """``None`` (DynamicCache), a Plan, a plan file path, or a callable ``(model, tokens) -> cache``."""
    if obj is None:
        return lambda model, tokens: None
    if isinstance(obj, (str, os.PathLike)):
        from ..plan import load

        obj = load(Path(obj))
    if hasattr(obj, "make_cache") and hasattr(obj, "layers"):
        plan = obj
        return lambda model, tokens: make_cache(plan, model)
    if callable(obj):
        kinds = [p.kind for p in inspect.signature(obj).parameters.values()]
        positional = sum(
            k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds
        )
        if positional >= 2 or inspect.Parameter.VAR_POSITIONAL in kinds:
            return obj
        return lambda model, tokens: obj(model)  # a one-argument factory, e.g. ``plan.make_cache``
    raise TypeError(
        f"expected None, a Plan, a plan path or a callable cache factory, got {type(obj).__name__}"
    )


def _new_cache(factory: CacheFactory, model: torch.nn.Module, tokens: int) -> Any:
    from transformers import DynamicCache

    cache = factory(model, tokens)
    return DynamicCache(config=cast(Any, model).config) if cache is None else cache


def full_bytes_per_token(model: torch.nn.Module) -> int:
    """K+V bytes per token of an uncompressed cache in the model dtype (all layers, all KV heads)."""
    cfg: Any = model.config
    q_heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or q_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * elem


def cache_nbytes(cache: Any) -> int | None:
    """Bytes the cache holds: ``cache.nbytes()`` when it has one, else the key/value tensors of its
    layers (DynamicCache); None when neither is known."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ---- building blocks --------------------------------------------------------------------------------
@torch.no_grad()
def prefill_context(model: torch.nn.Module, sample: Sample, cache: Any) -> torch.Tensor:
    """Push ``ids[:, :context_len]`` through ``cache``; returns the last position's logits [1, 1, V]."""
    from ..strategies.kvzip import has_kvzip, kvzip_prefill

    ids = sample.ids.to(next(model.parameters()).device)
    if has_kvzip(cache):  # KVzip groups score the context by re-reading it, then compact
        return kvzip_prefill(model, ids[:, : sample.context_len], cache, logits_to_keep=1).logits
    return model(ids[:, : sample.context_len], **cache_kw(cache), use_cache=True, logits_to_keep=1).logits


@torch.no_grad()
def continue_answer(
    model: torch.nn.Module, tokenizer: Any, sample: Sample, cache: Any, *, max_new_tokens: int = 10
) -> tuple[str, int]:
    """Greedy generation from the whole prompt on top of whatever ``cache`` already holds (only the
    tokens it has not seen are fed). Returns ``(decoded new text, tokens pushed through the cache)``."""
    ids = sample.ids.to(next(model.parameters()).device)
    out = cast(Any, model).generate(
        ids,
        attention_mask=torch.ones_like(ids),
        **cache_kw(cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=getattr(model.generation_config, "eos_token_id", None) or 0,
    )
    new = out[0, ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), int(out.shape[1]) - 1


def generate_answer(
    model: torch.nn.Module,
    tokenizer: Any,
    sample: Sample,
    cache: Any,
    *,
    question_aware: bool = False,
    max_new_tokens: int = 10,
) -> tuple[str, int]:
    """Greedy answer to ``sample``; returns ``(decoded new text, tokens pushed through the cache)``.

    Question-agnostic (default): prefill ``ids[:, :context_len]`` into ``cache`` first, then generate
    from the whole prompt (only the question tokens are new to the cache).
    """
    if not question_aware:
        prefill_context(model, sample, cache)
    return continue_answer(model, tokenizer, sample, cache, max_new_tokens=max_new_tokens)


def retrieval_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    cache_factory: Any = None,
    *,
    question_aware: bool = False,
    max_new_tokens: int = 10,
    progress: bool = False,
    desc: str = "",
) -> TaskResult:
    """Exact-match accuracy of greedy answers over ``samples`` (passkey or niah), one cache per sample."""
    factory = as_cache_factory(cache_factory)
    per_tok = full_bytes_per_token(model)
    t0 = time.perf_counter()
    details, nbytes, tokens = [], [], []
    for s in _progress(samples, progress, desc):
        cache = _new_cache(factory, model, s.length + max_new_tokens)
        text, n = generate_answer(
            model, tokenizer, s, cache, question_aware=question_aware, max_new_tokens=max_new_tokens
        )
        b = cache_nbytes(cache)
        nbytes.append(b)
        tokens.append(n)
        details.append(
            {
                "answer": s.answer,
                "generated": text,
                "correct": is_correct(text, s.answer),
                "length": s.length,
                "depths": [round(d, 4) for d in s.meta["needle_depths"]],
                "seed": s.meta["seed"],
                "kv_bytes": b,
            }
        )
    wall = time.perf_counter() - t0
    n = len(samples)
    known = [b for b in nbytes if b is not None]
    return TaskResult(
        task=samples[0].task if samples else "",
        length=int(samples[0].meta["target_length"]) if samples else 0,
        n=n,
        accuracy=sum(d["correct"] for d in details) / n if n else float("nan"),
        ppl=None,
        wall_s=wall,
        kv_bytes=sum(known) / len(known) if known and len(known) == n else None,
        full_kv_bytes=per_tok * sum(tokens) / max(n, 1),
        tokens=sum(tokens) / max(n, 1),
        details=details,
    )


def passkey_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    cache_factory: Any = None,
    *,
    length: int = 1024,
    samples: int = 5,
    seed: int = 0,
    **kw: Any,
) -> TaskResult:
    """Passkey accuracy at ``length`` tokens over :func:`passkey_samples`."""
    ss = passkey_samples(tokenizer, length, samples, seed)
    return retrieval_accuracy(model, tokenizer, ss, cache_factory, desc=f"passkey@{length}", **kw)


def passkey_samples(tokenizer: Any, length: int, samples: int, seed: int = 0) -> list[Sample]:
    """The passkey set: sample ``i`` has seed ``seed * 1000 + i`` and a depth drawn from stratum
    ``[i/samples, (i+1)/samples)``, so few samples still cover the whole context."""
    return [
        make_passkey_sample(tokenizer, length, seed * 1000 + i, depth=(i + _unit(seed, i, length)) / samples)
        for i in range(samples)
    ]


def niah_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    cache_factory: Any = None,
    *,
    length: int = 2048,
    samples: int = 5,
    needles: int = 4,
    seed: int = 0,
    **kw: Any,
) -> TaskResult:
    """Multi-key needle retrieval accuracy at ``length`` tokens with ``needles`` keys per prompt."""
    ss = [make_niah_sample(tokenizer, length, seed * 1000 + i, needles=needles) for i in range(samples)]
    return retrieval_accuracy(model, tokenizer, ss, cache_factory, desc=f"niah@{length}", **kw)


def sample_nll(model: torch.nn.Module, sample: Sample, cache: Any, *, chunk: int = 32) -> tuple[float, int]:
    """Summed NLL (nats) of ``ids[:, context_len:]`` given the context, all through ``cache``.

    The context is prefilled in one forward; the scored tokens are then fed in chunks of ``chunk``
    (teacher forcing), so their own K/V also go through the cache's strategy. Token ``t`` is
    predicted from the logits at ``t - 1``. Returns ``(nll_sum, n_scored)``.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    if not 1 <= sample.context_len < sample.length:
        raise ValueError(f"context_len={sample.context_len} must be in [1, {sample.length - 1}]")
    return continuation_nll(model, sample, cache, prefill_context(model, sample, cache), chunk=chunk)


@torch.no_grad()
def continuation_nll(
    model: torch.nn.Module, sample: Sample, cache: Any, logits: torch.Tensor, *, chunk: int = 32
) -> tuple[float, int]:
    """The scoring half of :func:`sample_nll`: ``cache`` holds the context and ``logits`` [1, 1, V]
    are the last context position's logits."""
    ids = sample.ids.to(next(model.parameters()).device)
    ctx, n = sample.context_len, ids.shape[1]
    ce = torch.nn.functional.cross_entropy
    nll = ce(logits[0, -1:].float(), ids[0, ctx : ctx + 1], reduction="sum").item()  # token ctx
    # feeding ids[s:e] yields the logits that predict ids[s+1:e+1]; the last token is never fed
    for s in range(ctx, n - 1, chunk):
        e = min(s + chunk, n - 1)
        out = model(ids[:, s:e], **cache_kw(cache), use_cache=True).logits
        nll += ce(out[0].float(), ids[0, s + 1 : e + 1], reduction="sum").item()
    return nll, n - ctx


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    cache_factory: Any = None,
    *,
    context: int = 3584,
    target: int = 512,
    samples: int = 1,
    seed: int = 0,
    chunk: int = 32,
    progress: bool = False,
) -> TaskResult:
    """Perplexity ``exp(mean NLL)`` of the last ``target`` tokens given ``context`` tokens of prose,
    pooled over ``samples`` windows (each with its own cache)."""
    factory = as_cache_factory(cache_factory)
    per_tok = full_bytes_per_token(model)
    t0 = time.perf_counter()
    total, count, details, nbytes = 0.0, 0, [], []
    for i in _progress(range(samples), progress, f"ppl@{context}+{target}"):
        s = make_ppl_sample(tokenizer, context, target, seed * 1000 + i)
        cache = _new_cache(factory, model, s.length)
        nll, n = sample_nll(model, s, cache, chunk=chunk)
        total, count = total + nll, count + n
        b = cache_nbytes(cache)
        nbytes.append(b)
        details.append(
            {"seed": s.meta["seed"], "nll": nll, "tokens": n, "ppl": math.exp(nll / n), "kv_bytes": b}
        )
    known = [b for b in nbytes if b is not None]
    tokens = context + target - 1  # the last scored token is never fed
    return TaskResult(
        task="ppl",
        length=context + target,
        n=samples,
        accuracy=None,
        ppl=math.exp(total / count) if count else float("nan"),
        wall_s=time.perf_counter() - t0,
        kv_bytes=sum(known) / len(known) if known and len(known) == samples else None,
        full_kv_bytes=float(per_tok * tokens),
        tokens=float(tokens),
        details=details,
    )


def suite_result(model: torch.nn.Module, tokenizer: Any, cache_factory: Any, family: str, split: str, length: int,
                 samples: int, seed: int = 0, progress: bool = False) -> TaskResult:
    """One :mod:`kvcompile.eval.suite` family at one length: accuracy (retrieval) or ppl (``lm``)."""
    from . import suite

    factory = as_cache_factory(cache_factory)
    per_tok = full_bytes_per_token(model)
    t0 = time.perf_counter()
    rows = []
    for s in _progress(suite.samples(tokenizer, family, split, length, samples, seed), progress, f"{family}@{length}"):
        rows.append({**suite.run_sample(model, tokenizer, s, _new_cache(factory, model, s.length + 2 * suite.MAX_NEW)),
                     "length": s.length})
    summary = suite.summarize(rows)[family]
    known = [r["kv_bytes"] for r in rows if r.get("kv_bytes") is not None]
    tokens = float(sum(r["length"] for r in rows) / len(rows))
    return TaskResult(
        task=family, length=length, n=len(rows), accuracy=summary.get("accuracy"), ppl=summary.get("ppl"),
        wall_s=time.perf_counter() - t0, kv_bytes=sum(known) / len(known) if len(known) == len(rows) else None,
        full_kv_bytes=per_tok * tokens, tokens=tokens, details=rows,
    )


# ---- the whole suite --------------------------------------------------------------------------------
def evaluate(
    plan_or_cache_factory: Any,
    loaded: Any,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int] = (1024, 2048, 4096),
    samples: int = 5,
    niah_length: int = 2048,
    niah_samples: int | None = None,
    niah_needles: int = 4,
    ppl_context: int = 3584,
    ppl_target: int = 512,
    ppl_samples: int = 1,
    ppl_chunk: int = 32,
    seed: int = 0,
    question_aware: bool = False,
    max_new_tokens: int = 10,
    progress: bool = True,
    split: str = "test",
) -> dict[str, Any]:
    """Run ``tasks`` with a plan / plan path / cache factory / None (DynamicCache) on ``loaded``
    (a :class:`kvcompile.models.Loaded`). Returns a JSON-able dict: ``results`` (one entry per task and
    length, see :class:`TaskResult`), ``config``, ``source`` (the text used) and ``machine``. The suite
    families (``SUITE_TASKS``: :mod:`kvcompile.eval.suite`, from ``split``) run ``samples`` samples at
    each of ``lengths``, question-agnostic.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks={list(tasks)}: unknown {unknown}; choose from {list(TASKS)}")
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise ValueError(f"model {loaded.name!r} has no tokenizer; the eval tasks need one")
    factory = as_cache_factory(plan_or_cache_factory)
    kw = {"question_aware": question_aware, "max_new_tokens": max_new_tokens, "progress": progress}
    results: list[TaskResult] = []
    t0 = time.perf_counter()
    if "passkey" in tasks:
        for length in lengths:
            results.append(
                passkey_accuracy(model, tok, factory, length=length, samples=samples, seed=seed, **kw)
            )
    if "niah" in tasks:
        results.append(
            niah_accuracy(
                model,
                tok,
                factory,
                length=niah_length,
                samples=niah_samples or samples,
                needles=niah_needles,
                seed=seed,
                **kw,
            )
        )
    if "ppl" in tasks:
        results.append(
            perplexity(
                model,
                tok,
                factory,
                context=ppl_context,
                target=ppl_target,
                samples=ppl_samples,
                seed=seed,
                chunk=ppl_chunk,
                progress=progress,
            )
        )
    for fam in (t for t in tasks if t in SUITE_TASKS):
        for length in lengths:
            results.append(suite_result(model, tok, factory, fam, split, length, samples, seed, progress))
    return {
        "model": loaded.name,
        "results": [r.to_json() for r in results],
        "wall_s": time.perf_counter() - t0,
        "config": {
            "tasks": list(tasks),
            "lengths": list(lengths),
            "samples": samples,
            "niah_length": niah_length,
            "niah_samples": niah_samples or samples,
            "niah_needles": niah_needles,
            "ppl_context": ppl_context,
            "ppl_target": ppl_target,
            "ppl_samples": ppl_samples,
            "ppl_chunk": ppl_chunk,
            "seed": seed,
            "split": split,
            "setting": "question-aware" if question_aware else "question-agnostic",
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
        },
        "source": source_info(),
        "machine": machine_info(),
    }


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch/transformers versions and the device the tasks ran on."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


# ---- helpers ----------------------------------------------------------------------------------------
def _unit(seed: int, i: int, length: int) -> float:
    import random

    return random.Random(f"depth:{seed}:{i}:{length}").random()


def _progress(it: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, file=sys.stderr, leave=False)
