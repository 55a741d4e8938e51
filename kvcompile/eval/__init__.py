"""Evaluation harness: offline, seeded long-context tasks on a real model with any KV cache.

Tasks (``tasks.py``): ``passkey`` retrieval at several lengths, multi-key needle retrieval
(``niah``), and perplexity of 512 tokens after ~3.5k tokens of compressed context (``ppl``); text
and prompts come from ``data.py`` (prose shipped with CPython, no downloads). ``cli.py`` is
``kvcompile eval``. The harness only needs a cache factory (or a Plan), so it depends on the
runtime, never on the compiler passes.

>>> from kvcompile.eval import evaluate                                         # doctest: +SKIP
>>> res = evaluate(plan, loaded, tasks=("passkey", "ppl"), lengths=(1024,), samples=5)  # doctest: +SKIP
"""

from __future__ import annotations

from .data import Sample, is_correct, make_niah_sample, make_passkey_sample, make_ppl_sample, source_info
from .tasks import (
    TASKS,
    CacheFactory,
    TaskResult,
    as_cache_factory,
    cache_nbytes,
    evaluate,
    generate_answer,
    niah_accuracy,
    passkey_accuracy,
    passkey_samples,
    perplexity,
    retrieval_accuracy,
    sample_nll,
)

__all__ = [
    "TASKS",
    "CacheFactory",
    "Sample",
    "TaskResult",
    "as_cache_factory",
    "cache_nbytes",
    "evaluate",
    "generate_answer",
    "is_correct",
    "make_niah_sample",
    "make_passkey_sample",
    "make_ppl_sample",
    "niah_accuracy",
    "passkey_accuracy",
    "passkey_samples",
    "perplexity",
    "retrieval_accuracy",
    "sample_nll",
    "source_info",
]
