"""What a pass may read besides the program (:class:`PassContext`), and what each pass declares it
needs and produces (:class:`Contract`): the runner checks the pipeline order against the declarations
before running anything."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..ir import Program
from ..targets import Target

# the program's strategy assignment is not a fact but is required / provided like one
ASSIGNMENT = "assignment"


@dataclasses.dataclass(frozen=True)
class PassContext:
    """Everything a pass may read besides the program: the target, the user's config, the model.

    ``config`` is the user's ``PlanConfig``: every setting that changes the plan is a typed field of it
    (``config.planner`` holds the planner's options), so it is hashed into the plan. ``options`` holds
    settings that do not change the plan (``calibration_cache``) and overrides used by tests.
    """

    target: Target
    config: Any  # kvcompile.plan.PlanConfig
    model: Any = None  # the nn.Module (None when planning from a program alone)
    tokenizer: Any = None
    progress: bool = True
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def opt(self, name: str, default: Any = None) -> Any:
        """A planner option: ``options[name]`` when given, else ``config.planner.<name>`` when the config
        has it and it is set, else ``default``."""
        if name in self.options:
            return self.options[name]
        planner = getattr(self.config, "planner", None)
        value = getattr(planner, name, None) if planner is not None else None
        return default if value is None else value


@dataclasses.dataclass(frozen=True)
class Contract:
    """Facts (``ir.FACT_TYPES`` keys, or ``"assignment"``) a pass reads and the ones it may write."""

    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()


Pass = Callable[[Program, PassContext], Program]


def contract(requires: tuple[str, ...] = (), provides: tuple[str, ...] = ()) -> Callable[[Pass], Pass]:
    """Decorator declaring a pass's :class:`Contract` (stored as ``fn.contract``)."""

    def mark(fn: Pass) -> Pass:
        fn.contract = Contract(frozenset(requires), frozenset(provides))  # type: ignore[attr-defined]
        return fn

    return mark
