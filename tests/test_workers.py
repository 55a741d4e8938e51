"""Calibration and verification spread their samples over forked workers: same results as one process."""

from __future__ import annotations

import math
import multiprocessing as mp
import os

import pytest
import torch

from kvcompile.passes import _workers
from kvcompile.passes import calibration as cal
from kvcompile.strategies import Full, Quant, SnapKV

fork_only = pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


@fork_only
def test_fork_map_keeps_order_and_uses_other_processes():
    seen: list[int] = []
    out = _workers.fork_map(_pid_and_square, list(range(7)), 2, on_result=lambda i, r: seen.append(i))
    assert [r[1] for r in out] == [x * x for x in range(7)] and seen == list(range(7))
    assert os.getpid() not in {r[0] for r in out}
    # a closure over a module (no pickling of the captured object: the children inherit it)
    w = torch.nn.Linear(3, 2)
    x = [torch.randn(1, 3) for _ in range(3)]
    got = _workers.fork_map(lambda t: w(t).detach(), x, 2)
    for a, t in zip(got, x, strict=True):
        torch.testing.assert_close(a, w(t).detach(), rtol=0, atol=0)


def test_worker_count():
    assert _workers.worker_count(3, 2) in (1, 2) and _workers.worker_count(1, 9) == 1
    with pytest.raises(ValueError, match="workers"):
        _workers.worker_count(0, 3)
    assert 1 <= _workers.default_workers() <= _workers.MAX_DEFAULT_WORKERS


@pytest.mark.slow
@fork_only
def test_calibration_on_two_workers_equals_one(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE_DIR", str(tmp_path))
    cands = [Full(), Quant(bits=2, group=32), SnapKV(budget=100, obs_window=16)]
    kw = dict(context=256, calibration="default:3x256", progress=False, cache=False)  # single, lm, multi (ask all)
    one = cal.run_calibration(smol.model, smol.tokenizer, cands, workers=1, **kw)
    two = cal.run_calibration(smol.model, smol.tokenizer, cands, workers=2, **kw)
    assert one["damage"] == two["damage"] and one["sensitivity"] == two["sensitivity"]
    assert one["samples"] == 3 and all(math.isfinite(x) for layer in one["damage"] for row in layer for x in row)


def test_robust_damage_is_mean_plus_spread():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0]])
    got = cal.robust_damage([a, b])
    torch.testing.assert_close(got, torch.tensor([[3.0, 0.0]], dtype=got.dtype))  # mean 2 + std 1
    torch.testing.assert_close(cal.robust_damage([a]), a)
