"""The pass pipeline: pure, named functions ``(Program, PassContext) -> Program`` in run order.

``PIPELINE`` is the one list of passes; ``run_pipeline`` logs and times each, runs
:func:`kvcompile.ir.verify` after each, and on failure re-raises a :class:`PassError` naming the
pass and the passes that ran before it. What each pass assumes and guarantees: passes/README.md.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from ..ir import Program, verify
from ..targets import Target

log = logging.getLogger("kvcompile.passes")


@dataclasses.dataclass(frozen=True)
class PassContext:
    """Everything a pass may read besides the program: the target, the user's config, the model."""

    target: Target
    config: Any  # kvcompile.plan.PlanConfig
    model: Any = None  # the nn.Module (None when planning from a program alone)
    tokenizer: Any = None
    progress: bool = True
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


Pass = Callable[[Program, PassContext], Program]


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


def assign_full(program: Program, ctx: PassContext) -> Program:
    """Give every KV head the ``full`` strategy unless a pass already assigned one."""
    if program.assignment is not None:
        return program
    full = {"name": "full", "dtype": "model"}
    assignment = tuple(tuple(dict(full) for _ in range(s.num_kv_heads)) for s in program.sites)
    return dataclasses.replace(program, assignment=assignment)


from ..codegen.lower import emit_code  # noqa: E402  (schedule + kernel sources into the plan; codegen issue)
from .calibration import calibrate  # noqa: E402  (pass modules import PassContext from here)
from .candidates import assign_candidates  # noqa: E402
from .place import place_kv  # noqa: E402  (TP x placement x batch; acts for gpus > 1 or a throughput objective)
from .solve import predict_costs, solve_assignment  # noqa: E402
from .verification import verify_plan  # noqa: E402

# Without a budget only assign_full acts (a full-cache plan); with one: candidates -> calibrated (or
# prior) damage -> CP-SAT -> roofline prediction -> end-to-end verification.
PIPELINE: list[tuple[str, Pass]] = [
    ("assign_candidates", assign_candidates),
    ("calibrate", calibrate),
    ("solve_assignment", solve_assignment),
    ("assign_full", assign_full),
    ("predict_costs", predict_costs),
    ("place_kv", place_kv),
    ("verify_plan", verify_plan),
    ("emit_code", emit_code),
]


def run_pipeline(
    program: Program, ctx: PassContext, pipeline: list[tuple[str, Pass]] | None = None
) -> Program:
    done: list[str] = []
    timings: dict[str, float] = {}
    for name, fn in pipeline if pipeline is not None else PIPELINE:
        t0 = time.perf_counter()
        try:
            program = verify(fn(program, ctx))
        except Exception as e:
            ran = ", ".join(done) or "none"
            raise PassError(f"pass {name!r} failed ({type(e).__name__}: {e}); passes before it: {ran}") from e
        timings[name] = round(time.perf_counter() - t0, 4)
        log.info("pass %s: %.3fs", name, timings[name])
        done.append(name)
    return program.with_facts(pass_timings=timings)
