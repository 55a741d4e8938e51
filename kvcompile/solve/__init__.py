"""Solvers behind plain data. This package is the only one in kvcompile that imports ortools.

* :mod:`kvcompile.solve.heads` — per-(layer, KV head) strategy choice under a byte/latency budget.
"""

from .heads import HeadProblem, HeadSolution, InfeasibleBudget, Option, solve_heads

__all__ = ["HeadProblem", "HeadSolution", "InfeasibleBudget", "Option", "solve_heads"]
