"""Tensor-parallel degree x KV placement (GPU memory or host memory) x batch, solved with CP-SAT.

Given a model's per-(layer, KV head) cache bytes (from the plan's strategies), its weights and a
node of ``gpus`` identical accelerators, choose the tensor-parallel degree ``t``, for every layer's
KV *group* (the heads of a layer that share a strategy) whether it lives in GPU memory (HBM) or in
host memory, and the batch; objective ``max-throughput``, ``min-latency`` or ``min-memory``.

Cost model (all per decode step, everything in integers: bytes, picoseconds)
---------------------------------------------------------------------------
* **Sharding** (Megatron-style TP, as transformers' ``tp_plan``): rank ``r`` holds ``1/t`` of every
  weight and the KV heads ``[r*H/t, (r+1)*H/t)`` of each layer. When ``t > H`` the KV heads are
  *replicated*: rank ``r`` holds head ``r*H // t``, each head has ``t/H`` copies, ``max(t, H)`` head
  caches exist in the node and every GPU still pays for one full head. Valid ``t``: ``t <= gpus``,
  ``t | num_q_heads`` and (``t | H`` or ``H | t``).
* **Per-GPU memory** (the worst rank): ``param_bytes/t`` + KV of its HBM-resident groups
  (``batch * bytes``) + activations + a runtime reserve (``reserve_fraction`` of the memory: CUDA
  context, allocator slack). Activations: one chunked-prefill chunk of ``prefill_chunk`` tokens
  (``chunk * (4*hidden + 2*intermediate/t) * act_bytes``: residual, q/k/v/o and MLP intermediates,
  flash attention keeps no scores) plus per sequence in the decode batch the same row
  and fp32 logits (``vocab * 4``).
* **Host placement** (FlexGen, arXiv:2303.06865; ShadowKV, arXiv:2410.21465): a host-resident group's
  KV of every sequence is streamed over the host link each step. Prefetch overlaps the next layer's
  transfer with this layer's work, so a layer costs ``max(HBM time, host-link time, compute time)``
  (the first layer's prefetch is not hidden; ignored). Fetched KV lands in an HBM staging buffer
  that attention then reads, so a host group also costs twice its bytes of HBM traffic: host
  placement never beats HBM on time, it only buys capacity. Host memory holds ``host_memory_bytes``
  per GPU.
* **Layer time**: HBM time = (weights/t/L + HBM-resident KV reads) / memory_bandwidth; compute =
  (2 * params/t/L + 4 * q_heads/t * head_dim * context) FLOPs per sequence / peak (attention FLOPs
  over the full context: an upper bound for compressed caches, harmless because decode is
  memory-bound). Weights are spread evenly over the layers (embedding / LM head included).
* **Data parallelism**: with ``data_parallel`` (default) the ``gpus // t`` TP groups of the node
  serve independent batches, so ``max-throughput`` ranks degrees by node tokens/s
  (``replicas * batch / step``); ``min-latency`` and ``min-memory`` look at one replica.
* **TP communication**: two all-reduces per layer of ``batch * hidden * act_bytes`` bytes, ring
  all-reduce ``2(t-1)/t * bytes / interconnect_bandwidth + interconnect_latency_s`` each, not
  overlapped with compute.

Search: the few valid ``t`` are enumerated; for each, one CP-SAT model (``parallel_model.build``)
with Booleans ``host[l, g]``, the batch ``b`` and ``y[l, g] = b if the group is in HBM else 0``
(linear by half-reification), per-layer times ``T_l >= each term`` (minimisation makes them the
max), and symmetry breaking between identical layers. ``min-latency`` and ``min-memory`` fix ``b``
to the requested batch (lexicographic objectives: step time or host bytes first, then the number of
host groups or the HBM peak, so host memory is used only when HBM is short). ``max-throughput``
maximises ``b / T*(b)``, ``T*(b)`` the fastest placement at batch ``b``: up to the largest all-HBM
batch ``T*`` is the all-HBM step time (host placement never beats HBM on time), evaluated in closed
form; above it batches are scanned upward and solved with CP-SAT only where the bound
``b / (T_allhbm(b) + spill_bound(b))`` (a fractional-knapsack lower bound on the spill cost) can
beat the best ratio, stopping at the first infeasible batch (feasibility is monotone in ``b``).
Dinkelbach's ratio method was tried first: its last subproblem (proving no better ratio exists)
did not close within seconds on 80 layers. Fixed seed, one worker and a deterministic work limit
make the result reproducible; ``status`` is ``FEASIBLE`` instead of ``OPTIMAL`` if the scan hit
``max_scan_solves``.

Example
-------
>>> p = ParallelProblem.uniform(layers=2, kv_heads=2, head_bytes=1000, num_q_heads=4, head_dim=8,
...     hidden_size=64, intermediate_size=128, vocab_size=100, num_params=10_000, param_bytes=20_000,
...     context=10, gpus=2, memory_bytes=100_000, memory_bandwidth=1e12, flops=1e15,
...     host_link_bandwidth=1e10, interconnect_bandwidth=1e11, interconnect_latency_s=0.0,
...     objective="min-latency", batch=4, reserve_fraction=0.0, prefill_chunk=1)
>>> solve_parallel(p).tp
1
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ortools.sat.python import cp_model

from .parallel_model import PS, Layout, Model, build, fixed_terms, layout, rank_heads

__all__ = [
    "OBJECTIVES",
    "ParallelInfeasible",
    "ParallelProblem",
    "ParallelSolution",
    "rank_heads",
    "solve_parallel",
]

OBJECTIVES = ("max-throughput", "min-latency", "min-memory")


class ParallelInfeasible(ValueError):
    """No tensor-parallel degree fits the model (the message gives each degree's reason)."""


@dataclass(frozen=True, slots=True)
class ParallelProblem:
    """Plain-data input of :func:`solve_parallel`. Bytes are per sequence at ``context`` tokens.

    ``kv_bytes[l][h]``: bytes KV head ``h`` of layer ``l`` holds for one sequence (exact, from the
    strategy); ``kv_read_bytes`` the bytes one decode step reads (default: ``kv_bytes``);
    ``groups[l][h]``: a label, heads of a layer with equal labels are placed together (default: one
    group per layer). ``batch`` is the requested batch (``min-latency``/``min-memory``) or the
    smallest acceptable one (``max-throughput``).
    """

    kv_bytes: tuple[tuple[int, ...], ...]
    num_q_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_params: int
    param_bytes: int
    context: int
    gpus: int
    memory_bytes: int
    memory_bandwidth: float
    flops: float
    host_link_bandwidth: float
    interconnect_bandwidth: float
    interconnect_latency_s: float
    kv_read_bytes: tuple[tuple[int, ...], ...] | None = None
    groups: tuple[tuple[str, ...], ...] | None = None
    act_bytes: int = 2
    objective: str = "max-throughput"
    batch: int = 1
    max_batch: int = 1024
    allow_host: bool = True
    host_memory_bytes: int = 256 * 2**30
    tp_degrees: tuple[int, ...] | None = None
    data_parallel: bool = True
    reserve_fraction: float = 0.05
    prefill_chunk: int = 2048
    work_limit: float = 5.0
    max_scan_solves: int = 64
    time_limit_s: float = 60.0
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} not allowed; choose one of {list(OBJECTIVES)}")
        if not self.kv_bytes or not self.kv_bytes[0]:
            raise ValueError("kv_bytes: need at least one layer with one KV head")
        heads = len(self.kv_bytes[0])
        for name in ("kv_bytes", "kv_read_bytes", "groups"):
            rows = getattr(self, name)
            if rows is not None and (len(rows) != len(self.kv_bytes) or any(len(r) != heads for r in rows)):
                raise ValueError(f"{name}: must have {len(self.kv_bytes)} layers x {heads} KV heads")
        if any(b < 0 for row in self.kv_bytes for b in row):
            raise ValueError("kv_bytes: must be >= 0")
        for name in ("gpus", "batch", "max_batch", "context", "memory_bytes", "param_bytes", "act_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.batch > self.max_batch:
            raise ValueError(f"batch={self.batch} must be <= max_batch={self.max_batch}")
        if not 0 <= self.reserve_fraction < 1:
            raise ValueError(f"reserve_fraction={self.reserve_fraction!r} must be in [0, 1)")
        if self.num_q_heads % heads:
            raise ValueError(f"num_q_heads={self.num_q_heads} not divisible by {heads} KV heads")

    @property
    def num_layers(self) -> int:
        return len(self.kv_bytes)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_bytes[0])

    @classmethod
    def uniform(cls, *, layers: int, kv_heads: int, head_bytes: int, **kw: Any) -> ParallelProblem:
        """A problem where every KV head holds ``head_bytes`` per sequence (hand-checkable instances)."""
        return cls(kv_bytes=tuple((head_bytes,) * kv_heads for _ in range(layers)), **kw)

    def valid_tp(self) -> list[int]:
        """TP degrees allowed by the GPU count and the head structure (see module docstring)."""
        h = self.num_kv_heads
        ok = [t for t in range(1, self.gpus + 1) if self.num_q_heads % t == 0 and (h % t == 0 or t % h == 0)]
        if self.tp_degrees is not None:
            ok = [t for t in ok if t in self.tp_degrees]
        return ok


@dataclass(frozen=True, slots=True)
class ParallelSolution:
    """The chosen configuration; ``to_facts()`` is the JSON form stored in ``Plan.placement``."""

    objective: str
    tp: int
    batch: int
    step_time_s: float
    tokens_per_s: float  # of one model replica (TP group)
    per_gpu: dict[str, int]  # weights / kv / activations / reserve / free / capacity (worst rank)
    host_kv_bytes: int  # whole node
    placement: tuple[tuple[tuple[str, tuple[int, ...], str], ...], ...]  # [layer] -> (group, heads, where)
    rank_heads: tuple[tuple[int, ...], ...]
    kv_copies: int  # head caches in the node per layer: max(tp, kv_heads)
    time_breakdown_s: dict[str, float]
    binding: str
    candidates: tuple[dict[str, Any], ...]
    status: str
    solves: int = 0
    replicas: int = 1  # data-parallel copies of the TP group in the node (gpus // tp)
    node_tokens_per_s: float = 0.0  # replicas * tokens_per_s

    @property
    def host_layers(self) -> list[int]:
        return [i for i, row in enumerate(self.placement) if any(w == "host" for _, _, w in row)]

    def to_facts(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["placement"] = [
            {"layer": i, "groups": [{"group": g, "heads": list(h), "where": w} for g, h, w in row]}
            for i, row in enumerate(self.placement)
        ]
        d["rank_heads"] = [list(r) for r in self.rank_heads]
        d["host_layers"] = self.host_layers
        d["candidates"] = list(self.candidates)
        return d


def _solver(p: ParallelProblem) -> cp_model.CpSolver:
    s = cp_model.CpSolver()
    s.parameters.random_seed = p.seed
    s.parameters.num_workers = p.workers
    # a deterministic work limit (not wall time) so a solve cut short still gives the same answer
    s.parameters.max_deterministic_time = p.work_limit
    s.parameters.max_time_in_seconds = p.time_limit_s
    return s


def _run(p: ParallelProblem, m: Model, sense: str, expr) -> tuple[cp_model.CpSolver, str] | None:
    """Solve ``m`` maximising (``sense="max"``) or minimising ``expr``; None when infeasible."""
    m.cp.clear_objective()
    if sense == "max":
        m.cp.maximize(expr)
    else:
        m.cp.minimize(expr)
    s = _solver(p)
    status = s.solve(m.cp)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return s, s.status_name(status)


def _lexmin(p: ParallelProblem, m: Model, first, second) -> tuple[cp_model.CpSolver, str] | None:
    """Minimise ``first``, then ``second`` among the optima of ``first`` (two solves, no big weights).

    Used with ``second`` = number of host-placed groups (or HBM peak) so that host memory is used only
    when it buys something: ties go to HBM.
    """
    got = _run(p, m, "min", first)
    if got is None:
        return None
    m.cp.add(first <= round(got[0].objective_value))
    return _run(p, m, "min", second) or got


def _fastest(p: ParallelProblem, lay: Layout, b: int):
    m = build(p, lay, b, b)
    got = _lexmin(p, m, m.step, sum(m.host.values()))
    return None if got is None else (m, *got)


def _solve_tp(p: ParallelProblem, t: int) -> dict[str, Any]:
    lay = layout(p, t)
    if isinstance(lay, str):
        return {"tp": t, "fits": False, "reason": lay}
    no_fit = {"tp": t, "fits": False, "reason": f"batch {p.batch} at context {p.context} does not fit"}
    if p.objective != "max-throughput":
        m = build(p, lay, p.batch, p.batch)
        if p.objective == "min-latency":
            got = _lexmin(p, m, m.step, sum(m.host.values()))
        else:  # min-memory: host bytes first (host only when HBM is short), then the worst GPU's HBM
            peak = m.cp.new_int_var(0, p.memory_bytes, "peak")
            for u in m.hbm_used:
                m.cp.add(peak >= u)
            got = _lexmin(p, m, m.host_used, peak)
        return no_fit if got is None else _read(p, m, *got, 2)
    # max-throughput = max over b of b / T*(b), T*(b) the fastest placement at batch b (CP-SAT, fixed b).
    # Up to the all-HBM batch, T*(b) is the all-HBM step time (host never beats HBM on time), whose
    # ratio is evaluated in closed form. Above it, b is scanned upward; a batch is solved only when
    # the bound b / (T_allhbm(b) + spill_bound(b)) could beat the best ratio, and the scan stops at
    # the first infeasible batch (feasibility is monotone in b) or after max_scan_solves solves.
    b_hbm = min(lay.hbm_batch(), p.max_batch) if p.allow_host or lay.hbm_batch() >= p.batch else 0
    best_b, best_ratio, solves, status = None, -1.0, 0, "OPTIMAL"
    for b in range(p.batch, b_hbm + 1):
        ratio = b / lay.all_hbm_step(b)
        if ratio > best_ratio:
            best_b, best_ratio = b, ratio
    if p.allow_host:
        for b in range(max(p.batch, b_hbm + 1), p.max_batch + 1):
            if b / (lay.all_hbm_step(b) + lay.spill_bound(b)) <= best_ratio:
                continue
            if solves >= p.max_scan_solves:
                status = "FEASIBLE"  # scan cut short: the best found, not proven optimal
                break
            got = _fastest(p, lay, b)
            solves += 1
            if got is None:
                break
            ratio = b / got[1].value(got[0].step)
            if ratio > best_ratio:
                best_b, best_ratio = b, ratio
    if best_b is None:
        return no_fit
    got = _fastest(p, lay, best_b)
    m, s, st = got
    return _read(p, m, s, st if status == "OPTIMAL" else status, solves + 1)


def _read(p: ParallelProblem, m: Model, s: cp_model.CpSolver, status: str, solves: int) -> dict[str, Any]:
    b = s.value(m.b)
    step_ps = s.value(m.step)
    f = m.lay.fixed
    kv = max(s.value(u) for u in m.hbm_used) - f["act1"] * b
    act = f["act0"] + f["act1"] * b
    free = p.memory_bytes - f["weights"] - kv - act - f["reserve"]
    placement = tuple(
        tuple(
            (lab, heads, "host" if s.value(m.host[layer, g]) else "hbm") for g, (lab, heads) in enumerate(gs)
        )
        for layer, gs in enumerate(m.lay.groups)
    )
    read = p.kv_read_bytes or p.kv_bytes
    L = p.num_layers
    ranks = m.lay.ranks
    worst = max(range(m.tp), key=lambda r: sum(read[la][h] for la in range(L) for h in ranks[r]))
    rank_rows = [[(hs, w) for _, hs, w in row] for row in placement]
    kv_hbm, kv_host = (
        b * sum(read[la][h] for la, row in enumerate(rank_rows) for hs, w in row if w == where
                for h in hs if h in ranks[worst])
        for where in ("hbm", "host")
    )  # fmt: skip
    breakdown = {
        "weights_read": p.param_bytes / m.tp / p.memory_bandwidth,
        "kv_hbm_read": (kv_hbm + 2 * kv_host) / p.memory_bandwidth,
        "kv_host_read": kv_host / p.host_link_bandwidth,
        "compute": m.lay.c_ps * b * L / PS,
        "tp_comm": (2 * L * m.lay.ring_ps * b + m.lay.comm0_ps) / PS,
    }
    return {
        "tp": m.tp,
        "fits": True,
        "batch": b,
        "step_time_s": step_ps / PS,
        "tokens_per_s": b / (step_ps / PS),
        "replicas": p.gpus // m.tp if p.data_parallel else 1,
        "node_tokens_per_s": (p.gpus // m.tp if p.data_parallel else 1) * b / (step_ps / PS),
        "per_gpu": {
            "weights": f["weights"],
            "kv": kv,
            "activations": act,
            "reserve": f["reserve"],
            "free": free,
            "capacity": p.memory_bytes,
        },
        "host_kv_bytes": s.value(m.host_used),
        "placement": placement,
        "ranks": ranks,
        "breakdown": breakdown,
        "status": status,
        "solves": solves,
    }


def _better(p: ParallelProblem, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether candidate ``a`` beats ``b`` (ties go to the smaller TP degree, tried first)."""
    if p.objective == "max-throughput":
        return a["node_tokens_per_s"] > b["node_tokens_per_s"] * (1 + 1e-9)
    if p.objective == "min-latency":
        return a["step_time_s"] < b["step_time_s"] * (1 - 1e-9)
    key = lambda c: (c["host_kv_bytes"], c["tp"] * (c["capacity_used"]))  # noqa: E731
    return key(a) < key(b)


def _binding(p: ParallelProblem, best: dict[str, Any], cands: list[dict[str, Any]]) -> str:
    """Why this configuration: what rules out smaller TP degrees, what stops the batch, what dominates."""
    why = []
    for c in (c for c in cands if c["tp"] < best["tp"]):
        got = c["reason"] if not c["fits"] else (
            f"{c['node_tokens_per_s']:.0f} tok/s ({c['replicas']} x batch {c['batch']})")  # fmt: skip
        why.append(f"TP={c['tp']}: {got}")
    g, gb = best["per_gpu"], 1e9
    per_seq = g["kv"] / max(best["batch"], 1) + fixed_terms(p, best["tp"])["act1"]
    if p.objective != "max-throughput":
        why.append(f"batch fixed at the requested {p.batch}")
    elif best["batch"] >= p.max_batch:
        why.append(f"batch capped at max_batch={p.max_batch}")
    if best["host_kv_bytes"] > 0:
        why.append(f"HBM short: {best['host_kv_bytes'] / gb:.1f} GB of KV placed in host memory")
    elif g["free"] < per_seq and best["batch"] < p.max_batch:
        why.append(
            f"HBM capacity: one more sequence needs {per_seq / gb:.2f} GB/GPU, {g['free'] / gb:.2f} GB free "
            f"(weights {g['weights'] / gb:.1f} + KV {g['kv'] / gb:.1f} + act {g['activations'] / gb:.1f})"
        )
    bd = best["breakdown"]
    top = max(bd, key=bd.get)
    why.append(f"step time dominated by {top} ({bd[top] * 1e3:.2f} of {best['step_time_s'] * 1e3:.2f} ms)")
    return "; ".join(why)


def solve_parallel(p: ParallelProblem) -> ParallelSolution:
    """Choose TP degree, KV placement and batch for ``p.objective``; raise ParallelInfeasible if none fits."""
    cands = []
    best = None
    for t in p.valid_tp():
        c = _solve_tp(p, t)
        if c["fits"]:
            c["capacity_used"] = p.memory_bytes - c["per_gpu"]["free"]
            if best is None or _better(p, c, best):
                best = c
        cands.append(c)
    if best is None:
        raise ParallelInfeasible(
            "no tensor-parallel degree fits: " + "; ".join(f"TP={c['tp']}: {c['reason']}" for c in cands)
            if cands
            else f"no valid TP degree for {p.gpus} GPUs, {p.num_q_heads} q / {p.num_kv_heads} KV heads"
        )
    summary: tuple[dict[str, Any], ...] = tuple(
        {
            k: c[k]
            for k in (
                "tp",
                "fits",
                "reason",
                "batch",
                "replicas",
                "node_tokens_per_s",
                "step_time_s",
                "host_kv_bytes",
            )
            if k in c
        }
        for c in cands
    )
    return ParallelSolution(
        objective=p.objective,
        tp=best["tp"],
        batch=best["batch"],
        step_time_s=best["step_time_s"],
        tokens_per_s=best["tokens_per_s"],
        per_gpu=best["per_gpu"],
        host_kv_bytes=best["host_kv_bytes"],
        placement=best["placement"],
        rank_heads=tuple(tuple(r) for r in best["ranks"]),
        kv_copies=max(best["tp"], p.num_kv_heads),
        time_breakdown_s=best["breakdown"],
        binding=_binding(p, best, cands),
        candidates=summary,
        status=best["status"],
        solves=sum(c.get("solves", 0) for c in cands),
        replicas=best["replicas"],
        node_tokens_per_s=best["node_tokens_per_s"],
    )
