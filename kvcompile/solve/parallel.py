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
* **TP communication**: two all-reduces per layer of ``batch * hidden * act_bytes`` bytes, ring
  all-reduce ``2(t-1)/t * bytes / interconnect_bandwidth + interconnect_latency_s`` each, not
  overlapped with compute.

Search: the few valid ``t`` are enumerated; for each, one CP-SAT model with Booleans ``host[l, g]``,
the batch ``b`` and ``y[l, g] = b if the group is in HBM else 0`` (linear by half-reification), and
per-layer times ``T_l >= each term`` (minimisation makes them the max). ``min-latency`` and
``min-memory`` fix ``b`` to the requested batch. ``max-throughput`` maximises the ratio
``b / step_time`` by Dinkelbach's method: solve ``max b * T_k - b_k * T`` and repeat from the new
point until the optimum is 0 (a few CP-SAT solves; exact, since each subproblem is solved to
optimality). Fixed seed, one worker and a time limit make the result deterministic.

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
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from ortools.sat.python import cp_model

OBJECTIVES = ("max-throughput", "min-latency", "min-memory")
PS = 1e12  # time unit of the integer model: picoseconds


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


def rank_heads(num_kv_heads: int, tp: int) -> list[list[int]]:
    """KV heads held by each of ``tp`` ranks (contiguous shards; one replicated head when tp > heads)."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return [list(range(r * per, (r + 1) * per)) for r in range(tp)]
    return [[r * num_kv_heads // tp] for r in range(tp)]


@dataclass(frozen=True, slots=True)
class ParallelSolution:
    """The chosen configuration; ``to_facts()`` is the JSON form stored in ``Plan.placement``."""

    objective: str
    tp: int
    batch: int
    step_time_s: float
    tokens_per_s: float
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


@dataclass
class _Layout:
    """Integer coefficients of one TP degree, shared by the CP-SAT model and the batch-scan bound.

    ``kvb[r][l][g]`` bytes per sequence rank ``r`` holds for group ``g`` of layer ``l``; ``hbm_ps`` /
    ``link_ps`` the picoseconds per sequence to read that group from HBM / over the host link.
    """

    tp: int
    groups: list[list[tuple[str, tuple[int, ...]]]]
    ranks: list[list[int]]
    fixed: dict[str, int]
    room: int
    kvb: list[list[list[int]]]
    hbm_ps: list[list[list[int]]]
    link_ps: list[list[list[int]]]
    w_ps: int
    c_ps: int
    ring_ps: int
    comm0_ps: int

    def __post_init__(self) -> None:
        # dense [rank, layer, group] arrays (zero-padded groups) for the vectorised batch scan
        gmax = max(len(gs) for gs in self.groups)

        def dense(table):
            a = np.zeros((self.tp, len(self.groups), gmax), dtype=np.float64)
            for r, rows in enumerate(table):
                for la, row in enumerate(rows):
                    a[r, la, : len(row)] = row
            return a

        self._kvb, self._hbm, self._link = dense(self.kvb), dense(self.hbm_ps), dense(self.link_ps)
        self._single = np.array([len(gs) == 1 for gs in self.groups])
        self._per_seq = self._kvb.sum(axis=(1, 2)) + self.fixed["act1"]  # [rank]

    def all_hbm_step(self, b: int) -> int:
        """Step time (ps) at batch ``b`` with every group in HBM (the fastest placement, if it fits)."""
        hbm = (self.w_ps + self._hbm.sum(axis=2).astype(np.int64) * b).max(axis=0)  # [layer]
        layers = int(np.maximum(hbm, self.c_ps * b).sum())
        return layers + 2 * len(self.groups) * self.ring_ps * b + self.comm0_ps

    def hbm_batch(self) -> int:
        """Largest batch that fits with every group in HBM."""
        return int(min(self.room // int(x) for x in self._per_seq))

    def spill_bound(self, b: int) -> int:
        """A lower bound (ps) on the extra step time any feasible host placement costs at batch ``b``.

        Each rank must spill at least ``need_r`` bytes. Spilling group (l, g) costs at least its
        staging read in HBM when layer l is HBM-bound on that rank (exactly its extra layer time when
        the layer has a single group); the fractional knapsack over these additive costs bounds the
        optimum from below.
        """
        hbm = self.w_ps + self._hbm.sum(axis=2) * b  # [rank, layer]
        base = np.maximum(hbm.max(axis=0), self.c_ps * b)  # [layer]
        alone = (
            np.maximum.reduce(
                [
                    (hbm[:, :, None] + self._hbm * b).max(axis=0),
                    self._link.max(axis=0) * b,
                    np.full(self._hbm.shape[1:], float(self.c_ps * b)),
                ]
            )
            - base[:, None]
        )  # [layer, group]: exact extra when the layer has one group
        best = 0.0
        for r in range(self.tp):
            need = b * self._per_seq[r] - self.room
            if need <= 0:
                continue
            staging = np.where((hbm[r] >= base)[:, None], self._hbm[r] * b, 0.0)
            cost = np.where(self._single[:, None], alone, staging).ravel()
            wgt = (self._kvb[r] * b).ravel()
            ok = wgt > 0
            cost, wgt = cost[ok], wgt[ok]
            if wgt.sum() < need:
                return 2**62  # this rank cannot free enough HBM at this batch
            order = np.argsort(cost / wgt, kind="stable")
            cw, cc = np.cumsum(wgt[order]), np.cumsum(cost[order])
            k = int(np.searchsorted(cw, need))
            prev_w = cw[k - 1] if k else 0.0
            prev_c = cc[k - 1] if k else 0.0
            lb = prev_c + cost[order][k] / wgt[order][k] * (need - prev_w)
            best = max(best, lb)
        return math.floor(best * (1 - 1e-9))


@dataclass
class _Model:
    """One CP-SAT model for a fixed TP degree, with the handles needed to read and re-solve it."""

    lay: _Layout
    cp: cp_model.CpModel
    b: cp_model.IntVar
    host: dict[tuple[int, int], cp_model.IntVar]
    step: cp_model.LinearExpr
    hbm_used: list[cp_model.LinearExpr]
    host_used: cp_model.LinearExpr

    @property
    def tp(self) -> int:
        return self.lay.tp


def _ps(seconds: float) -> int:
    return int(math.ceil(seconds * PS))


def _groups(p: ParallelProblem) -> list[list[tuple[str, tuple[int, ...]]]]:
    out = []
    for layer in range(p.num_layers):
        labels = p.groups[layer] if p.groups is not None else ("kv",) * p.num_kv_heads
        seen: dict[str, list[int]] = {}
        for h, lab in enumerate(labels):
            seen.setdefault(lab, []).append(h)
        out.append([(lab, tuple(hs)) for lab, hs in seen.items()])
    return out


def _fixed_terms(p: ParallelProblem, t: int) -> dict[str, int]:
    """Per-GPU bytes that do not depend on placement: weights, activations (A0 + A1*b), reserve."""
    row = 4 * p.hidden_size + 2 * p.intermediate_size // t
    return {
        "weights": math.ceil(p.param_bytes / t),
        "act0": p.prefill_chunk * row * p.act_bytes,
        "act1": row * p.act_bytes + p.vocab_size * 4,
        "reserve": int(p.reserve_fraction * p.memory_bytes),
    }


def _layout(p: ParallelProblem, t: int) -> _Layout | str:
    """The coefficients for TP degree ``t``, or a reason string when the weights alone do not fit."""
    f = _fixed_terms(p, t)
    room = p.memory_bytes - f["weights"] - f["act0"] - f["reserve"]
    if room <= 0:
        return (
            f"weights {f['weights'] / 1e9:.1f} GB/GPU + activations {f['act0'] / 1e9:.1f} GB + reserve "
            f"{f['reserve'] / 1e9:.1f} GB exceed {p.memory_bytes / 1e9:.1f} GB"
        )
    groups = _groups(p)
    ranks = rank_heads(p.num_kv_heads, t)
    read = p.kv_read_bytes or p.kv_bytes

    def per_rank(table, scale):
        return [
            [
                [scale(sum(table[la][h] for h in hs if h in ranks[r])) for _, hs in gs]
                for la, gs in enumerate(groups)
            ]
            for r in range(t)
        ]

    L = p.num_layers
    flops_seq = 2 * p.num_params / t / L + 4 * (p.num_q_heads // t) * p.head_dim * p.context
    ring = 0.0 if t == 1 else 2 * (t - 1) / t * p.hidden_size * p.act_bytes / p.interconnect_bandwidth
    return _Layout(
        tp=t,
        groups=groups,
        ranks=ranks,
        fixed=f,
        room=room,
        kvb=per_rank(p.kv_bytes, int),
        hbm_ps=per_rank(read, lambda x: _ps(x / p.memory_bandwidth)),
        link_ps=per_rank(read, lambda x: _ps(x / p.host_link_bandwidth)),
        w_ps=_ps(p.param_bytes / t / L / p.memory_bandwidth),
        c_ps=_ps(flops_seq / p.flops),
        ring_ps=_ps(ring),
        comm0_ps=0 if t == 1 else 2 * L * _ps(p.interconnect_latency_s),
    )


def _build(p: ParallelProblem, lay: _Layout, lo: int, hi: int) -> _Model:
    """The CP-SAT model of the module docstring for one TP degree and batch range [lo, hi]."""
    t, groups, L = lay.tp, lay.groups, p.num_layers
    cp = cp_model.CpModel()
    b = cp.new_int_var(lo, hi, "batch")
    host: dict[tuple[int, int], cp_model.IntVar] = {}
    y: dict[tuple[int, int], cp_model.IntVar] = {}
    for layer, gs in enumerate(groups):
        for g in range(len(gs)):
            x = cp.new_bool_var(f"host_{layer}_{g}")
            if not p.allow_host:
                cp.add(x == 0)
            yy = cp.new_int_var(0, hi, f"y_{layer}_{g}")  # sequences whose (layer, group) KV is in HBM
            cp.add(yy == b).only_enforce_if(~x)
            cp.add(yy == 0).only_enforce_if(x)
            host[layer, g], y[layer, g] = x, yy
    # Layers with identical KV rows are interchangeable: break the symmetry (which of them spill does
    # not change any cost) by spilling the later ones first. Without this CP-SAT proves little on
    # 80 identical layers.
    sig_last: dict[tuple, int] = {}
    for layer, gs in enumerate(groups):
        sig = tuple(
            (hs, *(lay.kvb[r][layer][g] for r in range(t)), *(lay.hbm_ps[r][layer][g] for r in range(t)))
            for g, (_, hs) in enumerate(gs)
        )
        if sig in sig_last:
            for g in range(len(gs)):
                cp.add(host[sig_last[sig], g] <= host[layer, g])
        sig_last[sig] = layer

    pairs = [(layer, g) for layer, gs in enumerate(groups) for g in range(len(gs))]
    hbm_used = []
    for r in range(t):
        used = sum(lay.kvb[r][la][g] * y[la, g] for la, g in pairs) + lay.fixed["act1"] * b
        cp.add(used <= lay.room)
        hbm_used.append(used)
    host_used = sum(lay.kvb[r][la][g] * (b - y[la, g]) for r in range(t) for la, g in pairs)
    cp.add(host_used <= p.host_memory_bytes * t)

    horizon = lay.w_ps + hi * (
        lay.c_ps
        + 2 * max(sum(lay.hbm_ps[r][la]) + sum(lay.link_ps[r][la]) for r in range(t) for la in range(L))
    )
    layer_times = []
    for layer, gs in enumerate(groups):
        tl = cp.new_int_var(0, horizon, f"T_{layer}")
        cp.add(tl >= lay.c_ps * b)
        for r in range(t):
            # host-resident KV is written into an HBM staging buffer and read by attention: 2x traffic
            cp.add(
                tl >= lay.w_ps + sum(lay.hbm_ps[r][layer][g] * (2 * b - y[layer, g]) for g in range(len(gs)))
            )
            cp.add(tl >= sum(lay.link_ps[r][layer][g] * (b - y[layer, g]) for g in range(len(gs))))
        layer_times.append(tl)
    step = sum(layer_times) + 2 * L * lay.ring_ps * b + lay.comm0_ps
    return _Model(lay, cp, b, host, step, hbm_used, host_used)


def _solver(p: ParallelProblem) -> cp_model.CpSolver:
    s = cp_model.CpSolver()
    s.parameters.random_seed = p.seed
    s.parameters.num_workers = p.workers
    # a deterministic work limit (not wall time) so a solve cut short still gives the same answer
    s.parameters.max_deterministic_time = p.work_limit
    s.parameters.max_time_in_seconds = p.time_limit_s
    return s


def _run(p: ParallelProblem, m: _Model, sense: str, expr) -> tuple[cp_model.CpSolver, str] | None:
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


def _lexmin(p: ParallelProblem, m: _Model, first, second) -> tuple[cp_model.CpSolver, str] | None:
    """Minimise ``first``, then ``second`` among the optima of ``first`` (two solves, no big weights).

    Used with ``second`` = number of host-placed groups (or HBM peak) so that host memory is used only
    when it buys something: ties go to HBM.
    """
    got = _run(p, m, "min", first)
    if got is None:
        return None
    m.cp.add(first <= round(got[0].objective_value))
    return _run(p, m, "min", second) or got


def _fastest(p: ParallelProblem, lay: _Layout, b: int):
    m = _build(p, lay, b, b)
    got = _lexmin(p, m, m.step, sum(m.host.values()))
    return None if got is None else (m, *got)


def _solve_tp(p: ParallelProblem, t: int) -> dict[str, Any]:
    lay = _layout(p, t)
    if isinstance(lay, str):
        return {"tp": t, "fits": False, "reason": lay}
    no_fit = {"tp": t, "fits": False, "reason": f"batch {p.batch} at context {p.context} does not fit"}
    if p.objective != "max-throughput":
        m = _build(p, lay, p.batch, p.batch)
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


def _read(p: ParallelProblem, m: _Model, s: cp_model.CpSolver, status: str, solves: int) -> dict[str, Any]:
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
        return a["tokens_per_s"] > b["tokens_per_s"] * (1 + 1e-9)
    if p.objective == "min-latency":
        return a["step_time_s"] < b["step_time_s"] * (1 - 1e-9)
    key = lambda c: (c["host_kv_bytes"], c["tp"] * (c["capacity_used"]))  # noqa: E731
    return key(a) < key(b)


def _binding(p: ParallelProblem, best: dict[str, Any], cands: list[dict[str, Any]]) -> str:
    """Why this configuration: what rules out smaller TP degrees, what stops the batch, what dominates."""
    why = []
    for c in (c for c in cands if c["tp"] < best["tp"]):
        got = f"{c['tokens_per_s']:.0f} tok/s at batch {c['batch']}" if c["fits"] else c["reason"]
        why.append(f"TP={c['tp']}: {got}")
    g, gb = best["per_gpu"], 1e9
    per_seq = g["kv"] / max(best["batch"], 1) + _fixed_terms(p, best["tp"])["act1"]
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
    summary = tuple(
        {
            k: c[k]
            for k in ("tp", "fits", "reason", "batch", "tokens_per_s", "step_time_s", "host_kv_bytes")
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
    )
