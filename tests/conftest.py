"""Shared fixtures. The real model loads once per session (0.3 s after the first, cached copy)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels must see this before they are defined
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (fp32, sdpa), seeded, in eval mode: ``Loaded(model, tokenizer, name)``."""
    from kvcompile.models import load

    torch.manual_seed(0)
    return load("smollm2-135m")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
