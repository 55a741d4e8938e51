"""Serving-engine targets: what a plan must be restricted to so that a real engine executes it.

An engine module (``kvcompile/engines/<name>.py``) provides, without importing the engine at module
level (only ``engines/<name>`` ever imports it, and only inside the functions that need it):

* ``candidates(context, target, kv_budget=None) -> list[Strategy]``: the per-layer settings the installed engine
  executes *correctly* on the target's platform (the planner's grid; one setting per layer);
* ``record(plan) -> dict``: ``Plan.engine`` (name, exact version, platform, per-layer settings, the
  engine arguments and the predicted capacity);
* ``check(plan)``: raise :class:`EngineError` (one line) for a plan the engine must not run.

``ENGINES`` is the one registry; SGLang / TensorRT-LLM would each be one more module and one line.

Example
-------
>>> from kvcompile.engines import get                      # doctest: +SKIP
>>> get("vllm").candidates(4096, load_target("cpu"))[:2]    # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from types import ModuleType

ENGINES: dict[str, str] = {"vllm": "kvcompile.engines.vllm"}


class EngineError(ValueError):
    """A plan cannot be executed (correctly) by the requested serving engine; the message is one line."""


def get(name: str) -> ModuleType:
    """The engine module registered as ``name`` (:class:`EngineError` naming the known engines otherwise)."""
    if name not in ENGINES:
        raise EngineError(f"engine={name!r} is not known; choose one of {sorted(ENGINES)}")
    return importlib.import_module(ENGINES[name])


__all__ = ["ENGINES", "EngineError", "get"]
