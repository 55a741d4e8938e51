"""The pass pipeline: pure, named functions ``(Program, PassContext) -> Program`` in run order.

``PIPELINE`` is the one list of passes; each declares a :class:`Contract` (facts it requires and
provides). ``run_pipeline`` first checks the order (:func:`check_pipeline`: every required fact is
provided by an earlier pass; ad-hoc passes without a contract are not checked), then logs and times each pass, runs
:func:`kvcompile.ir.verify` after each (typed facts), checks it wrote only what it declared, and on
failure re-raises a :class:`PassError` naming the pass and the passes that ran before it. What each
pass assumes and guarantees: passes/README.md.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ..ir import FACT_TYPES, Program, verify
from .context import ASSIGNMENT, Contract, Pass, PassContext, contract

__all__ = ["ASSIGNMENT", "CONTRACTS", "PIPELINE", "Contract", "Pass", "PassContext", "PassError", "check_pipeline",
           "contract_of",
           "contract", "run_pipeline"]

log = logging.getLogger("kvcompile.passes")


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


@contract(provides=(ASSIGNMENT,))
def assign_full(program: Program, ctx: PassContext) -> Program:
    """Give every KV head the ``full`` strategy unless a pass already assigned one."""
    if program.assignment is not None:
        return program
    full = {"name": "full", "dtype": "model"}
    assignment = tuple(tuple(dict(full) for _ in range(s.num_kv_heads)) for s in program.sites)
    return dataclasses.replace(program, assignment=assignment)


from ..codegen.lower import emit_code  # noqa: E402  (schedule + kernel sources into the plan; codegen issue)
from .calibration import calibrate  # noqa: E402
from .candidates import assign_candidates  # noqa: E402
from .place import place_kv  # noqa: E402  (TP x placement x batch; acts for gpus > 1 or a throughput objective)
from .solve import predict_costs, solve_assignment  # noqa: E402
from .verification import verify_plan  # noqa: E402

# Contracts of passes defined outside this package (codegen) are declared here.
CONTRACTS: dict[str, Contract] = {
    "emit_code": Contract(frozenset({ASSIGNMENT}), frozenset({"schedule", "kernels", "notes"})),
}

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


def contract_of(name: str, fn: Pass) -> Contract | None:
    return getattr(fn, "contract", None) or CONTRACTS.get(name)


def check_pipeline(pipeline: list[tuple[str, Pass]], have: frozenset[str] = frozenset()) -> None:
    """Refuse a pipeline whose passes are out of order: a pass that requires a fact no earlier pass
    provides (``have``: facts already in the program), or that declares facts ``ir.FACT_TYPES`` lacks."""
    provided = set(have)
    later: dict[str, str] = {}
    for name, fn in pipeline:
        c = contract_of(name, fn)
        if c is not None:
            for f in c.provides:
                later.setdefault(f, name)
    for i, (name, fn) in enumerate(pipeline):
        c = contract_of(name, fn)
        if c is None:  # an ad-hoc pass (tests, experiments): unchecked, assumed to need nothing
            continue
        unknown = (c.requires | c.provides) - set(FACT_TYPES) - {ASSIGNMENT}
        if unknown:
            raise PassError(f"pass {name!r} declares unknown facts {sorted(unknown)}")
        missing = sorted(c.requires - provided)
        if missing:
            where = ", ".join(f"{m!r} (provided by {later[m]!r})" if m in later else repr(m) for m in missing)
            raise PassError(f"pipeline out of order: pass {name!r} (position {i}) requires {where}, which no "
                            "earlier pass provides")
        provided |= c.provides


def run_pipeline(
    program: Program, ctx: PassContext, pipeline: list[tuple[str, Pass]] | None = None
) -> Program:
    passes = pipeline if pipeline is not None else PIPELINE
    have = frozenset(program.facts) | ({ASSIGNMENT} if program.assignment is not None else set())
    check_pipeline(passes, have)
    done: list[str] = []
    timings: dict[str, float] = {}
    for name, fn in passes:
        t0 = time.perf_counter()
        c = contract_of(name, fn)
        try:
            out = verify(fn(program, ctx))
            wrote = {k for k in out.facts if k not in program.facts or out.facts[k] is not program.facts[k]}
            if out.assignment is not program.assignment:
                wrote.add(ASSIGNMENT)
            if c is not None and wrote - c.provides:
                raise PassError(f"wrote facts it does not declare: {sorted(wrote - c.provides)}")
            program = out
        except Exception as e:
            ran = ", ".join(done) or "none"
            raise PassError(f"pass {name!r} failed ({type(e).__name__}: {e}); passes before it: {ran}") from e
        timings[name] = round(time.perf_counter() - t0, 4)
        log.info("pass %s: %.3fs", name, timings[name])
        done.append(name)
    return program.with_facts(pass_timings=timings)
