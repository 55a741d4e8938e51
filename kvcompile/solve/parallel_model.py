"""The integer CP-SAT model behind :func:`kvcompile.solve.parallel.solve_parallel` (one TP degree).

``layout(p, t)`` turns a :class:`~kvcompile.solve.parallel.ParallelProblem` into integer coefficients
(bytes, picoseconds) per rank, layer and KV group; ``build(p, lay, lo, hi)`` is the CP-SAT model of
the ``solve.parallel`` module docstring over batches ``[lo, hi]``; :class:`Layout` also evaluates the
all-HBM step time and a lower bound on the cost of spilling, used by the batch scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from ortools.sat.python import cp_model

if TYPE_CHECKING:
    from .parallel import ParallelProblem

PS = 1e12  # time unit of the integer model: picoseconds


def rank_heads(num_kv_heads: int, tp: int) -> list[list[int]]:
    """KV heads held by each of ``tp`` ranks (contiguous shards; one replicated head when tp > heads)."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return [list(range(r * per, (r + 1) * per)) for r in range(tp)]
    return [[r * num_kv_heads // tp] for r in range(tp)]


@dataclass
class Layout:
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
class Model:
    """One CP-SAT model for a fixed TP degree, with the handles needed to read and re-solve it."""

    lay: Layout
    cp: cp_model.CpModel
    b: cp_model.IntVar
    host: dict[tuple[int, int], cp_model.IntVar]
    step: cp_model.LinearExpr
    hbm_used: list[cp_model.LinearExpr]
    host_used: cp_model.LinearExpr | int  # sum() over no host-placeable group is the int 0

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


def fixed_terms(p: ParallelProblem, t: int) -> dict[str, int]:
    """Per-GPU bytes that do not depend on placement: weights, activations (A0 + A1*b), reserve."""
    row = 4 * p.hidden_size + 2 * p.intermediate_size // t
    return {
        "weights": math.ceil(p.param_bytes / t),
        "act0": p.prefill_chunk * row * p.act_bytes,
        "act1": row * p.act_bytes + p.vocab_size * 4,
        "reserve": int(p.reserve_fraction * p.memory_bytes),
    }


def layout(p: ParallelProblem, t: int) -> Layout | str:
    """The coefficients for TP degree ``t``, or a reason string when the weights alone do not fit."""
    f = fixed_terms(p, t)
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
    return Layout(
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


def build(p: ParallelProblem, lay: Layout, lo: int, hi: int) -> Model:
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
    return Model(lay, cp, b, host, step, hbm_used, host_used)
