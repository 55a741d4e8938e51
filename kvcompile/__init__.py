"""kvcompile: compile a PyTorch LLM into a per-head KV-cache execution plan for a hardware target.

>>> import kvcompile                                                     # doctest: +SKIP
>>> plan = kvcompile.optimize("smollm2-135m", target="h100", context=4096)  # doctest: +SKIP
>>> plan.save("smollm2.kvplan"); plan = kvcompile.load("smollm2.kvplan")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .ir import Program
    from .plan import Plan


def capture(model: Any, **kw: Any) -> Program:
    """Capture a model's attention sites into a :class:`~kvcompile.ir.Program` (torch.export)."""
    from .capture import capture as _capture

    return _capture(model, **kw)


def optimize(model: Any, target: str = "h100", **kw: Any) -> Plan:
    """Compile ``model`` (an nn.Module or a spec string for :func:`kvcompile.models.load`) to a Plan."""
    from .api import optimize as _optimize

    return _optimize(model, target=target, **kw)


def load(path: Any) -> Plan:
    """Load and verify a plan file (raises :class:`kvcompile.plan.PlanError`)."""
    from .codegen.check import load as _load

    return _load(path)


__all__ = ["__version__", "capture", "optimize", "load"]
