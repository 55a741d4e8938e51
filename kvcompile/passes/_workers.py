"""Per-sample work of calibration and verification on every core the process may use.

Calibration samples and verification runs are independent forward passes of one model. Workers are
``fork``-ed children: they share the parent's weights copy-on-write (nothing is pickled but the work
item's index and the small result), so any ``nn.Module`` works, not only registered models. Each
worker runs ``torch.get_num_threads() // workers`` intra-op threads (at least 1), so the machine is
never oversubscribed; results are returned in item order, so the plan does not depend on the worker
count (tests/test_workers.py). Without ``fork`` (macOS spawn default, Windows), with one worker or
one item, the work runs in this process.

``options["workers"]`` (``PassContext.options``: it does not change the plan) sets the count;
default: the usable cores, at most 4.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

MAX_DEFAULT_WORKERS = 4
# the task of the pool being created: a fork child inherits it with the rest of the parent's memory
_TASK: tuple[Callable[[Any], Any], Sequence[Any]] | None = None


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def worker_count(requested: int | None, items: int) -> int:
    """Processes for ``items`` work items: ``requested`` (None = :func:`default_workers`), at most one per
    item, 1 without ``fork``."""
    n = default_workers() if requested is None else int(requested)
    if n < 1:
        raise ValueError(f"workers={n} must be >= 1")
    if "fork" not in mp.get_all_start_methods():
        return 1
    return max(1, min(n, items))


def _init(threads: int) -> None:
    torch.set_num_threads(threads)


def _call(i: int) -> Any:
    assert _TASK is not None
    fn, items = _TASK
    return fn(items[i])


def fork_map(fn: Callable[[T], R], items: Sequence[T], workers: int,
             on_result: Callable[[int, R], None] | None = None) -> list[R]:
    """``[fn(x) for x in items]``, on ``workers`` forked processes when > 1; ``on_result(i, r)`` is
    called in this process as each result arrives (progress bars)."""
    global _TASK
    out: list[Any] = [None] * len(items)
    if workers <= 1 or len(items) <= 1:
        for i, x in enumerate(items):
            out[i] = fn(x)
            if on_result is not None:
                on_result(i, out[i])
        return out
    threads = max(1, torch.get_num_threads() // workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust tokenizer's pool does not survive fork
    _TASK = (fn, items)
    try:
        with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(threads,)) as pool:
            for i, r in enumerate(pool.imap(_call, range(len(items)))):
                out[i] = r
                if on_result is not None:
                    on_result(i, r)
    finally:
        _TASK = None
    return out
