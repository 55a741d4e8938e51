"""The plan's derived codegen records checked against this kvcompile: the front door's loader.

``kvcompile.plan.load`` checks a plan file as data (strict JSON, types, hash, cross-field invariants,
exact byte predictions). The schedule and kernel records are derived by *codegen*, so they are checked
here, above the plan module (the plan never imports codegen): :func:`load` = ``plan.load`` +
:func:`check_codegen`; ``kvcompile.load`` is this function.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..plan import Plan, PlanError
from ..plan import load as _read_plan
from .cache import render, sha256
from .keys import KernelKey
from .lower import lower


def load(path: str | os.PathLike[str]) -> Plan:
    """Read a plan that may come from anyone (``plan.load``) and check its schedule and kernel records."""
    plan = _read_plan(path)
    try:
        check_codegen(plan)
    except PlanError as e:
        raise PlanError(f"{Path(path)}: {str(e)[:600]}") from None
    return plan


def check_codegen(plan: Plan) -> None:
    """The plan's schedule and kernel records must be exactly what this kvcompile lowers its layers to.

    Kernel source is never taken from a plan to run: the runtime renders every kernel from its
    ``KernelKey`` with the installed kvcompile (``codegen.cache.load_kernel``). A plan may carry
    sources and hashes (to show what was compiled); here they are only compared with the rendering,
    and any difference is a PlanError naming the kernel.
    """
    if plan.schedule is None and plan.kernels is None:
        return
    try:
        sched = lower(plan)
    except PlanError:
        raise
    except ValueError as e:
        raise PlanError(f"the plan's layers cannot be lowered to a schedule: {e}") from None
    if plan.schedule is not None:
        want = sched.to_json()
        if len(plan.schedule) != len(want):
            raise PlanError(f"schedule has {len(plan.schedule)} instructions, the layers lower to {len(want)} "
                            "(edited, or compiled by another kvcompile)")  # fmt: skip
        for i, (got, exp) in enumerate(zip(plan.schedule, want, strict=True)):
            if got != exp:
                raise PlanError(f"schedule instruction {i} ({str(got.get('op'))[:30]}, layer "
                                f"{str(got.get('layer'))[:12]}) differs from the lowering of the layers")  # fmt: skip
    if plan.kernels is not None:
        extra = sorted(set(plan.kernels) - set(sched.kernels))
        missing = sorted(set(sched.kernels) - set(plan.kernels))
        if extra or missing:
            which = (
                f"kernel {extra[0][:80]!r} is not used by the schedule" if extra else f"kernel {missing[0]} is missing"
            )
            raise PlanError(f"kernels: {which}")
        for uri, rec in plan.kernels.items():
            if set(rec) - {"source", "sha256", "key"}:
                raise PlanError(f"kernel {uri}: unknown fields {sorted(set(rec) - {'source', 'sha256', 'key'})}")
            if rec.get("key") != sched.kernels[uri]:
                raise PlanError(f"kernel {uri}: key is not the one the schedule needs (edited, or another kvcompile)")
            src = render(KernelKey.from_json(dict(sched.kernels[uri])))
            if rec.get("source") is not None and rec["source"] != src:
                raise PlanError(f"kernel {uri}: embedded source differs from this kvcompile's rendering of its key "
                                "(edited, or compiled by another version); refusing the plan")  # fmt: skip
            if rec.get("sha256") is not None and rec["sha256"] != sha256(src):
                raise PlanError(f"kernel {uri}: recorded sha256 does not match this kvcompile's rendering")
