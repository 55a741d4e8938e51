"""The schedule interpreter: ``for instr in phase: HANDLERS[instr.op](ctx, instr)`` per layer forward.

The runtime cache calls :func:`run_layer` from its attention function when the cache's backend is a
kernel backend:

* ``"triton"`` — CUDA kernels from the kernel cache (``kvcompile.codegen``);
* ``"triton-interpret"`` — the same kernels on CPU under ``TRITON_INTERPRET=1`` (tests);
* ``"torch"`` — every instruction's pure-torch reference (``kvcompile.codegen.reference``) over the
  same storage, always available.

``validate=True`` re-runs each instruction with the torch reference and records the max abs error per
op in ``Interpreter.errors`` (decode attention against the store's own ``attend``; flushes against
``_quant_ref``: codes, scales and zeros). The fast path's result is what the model continues with.

Example
-------
>>> cache = make_cache(plan, model, backend="triton-interpret")       # doctest: +SKIP
>>> interp = attach(cache, validate=True)                             # doctest: +SKIP
>>> model.generate(ids, cache=cache, max_new_tokens=8)      # doctest: +SKIP
>>> interp.errors                                                     # doctest: +SKIP
{'attend_decode': 3.1e-07, 'flush_quant': 0.0}
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..codegen import reference as ref
from ..codegen.cache import load_kernel
from ..codegen.decode_compact import ALWAYS_VALID, decode_compact, decode_compact_scored, decode_fp8, decode_full
from ..codegen.decode_mixed import GroupView, decode_mixed
from ..codegen.decode_quant import decode_quant
from ..codegen.keys import MIXED_ONLY, KernelKey
from ..codegen.lower import load_plan_kernels, lower, lower_strategies
from ..codegen.quant_append import quantize_append
from ..codegen.schedule import Instr, Schedule
from ..plan import PlanError
from ..strategies._attn import leading_pads
from .cpu_decode import cpu_attend, cpu_library

KERNEL_BACKENDS = ("torch", "cpu", "triton-interpret", "triton")


@dataclasses.dataclass
class Ctx:
    """One layer forward: its stores, the new q/k/v, and the output being filled."""

    interp: Interpreter
    layer: Any  # KVCompileLayer
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    scale: float
    out: torch.Tensor

    def heads(self, gi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q, k, v) of head group ``gi`` and its query-head index (None: the whole layer)."""
        idx = self.layer.index(self.q.device)[gi]
        if idx is None:
            return self.q, self.k, self.v, None
        kv, qi = idx
        return self.q.index_select(1, qi), self.k.index_select(1, kv), self.v.index_select(1, kv), qi

    def put(self, qi: torch.Tensor | None, o: torch.Tensor) -> None:
        if qi is None:
            self.out.copy_(o.to(self.out.dtype))
        else:
            self.out.index_copy_(1, qi, o.to(self.out.dtype))


class Interpreter:
    """Executes a :class:`Schedule` for the layers registered with it (see module docstring)."""

    def __init__(self, schedule: Schedule, backend: str, *, validate: bool = False, kernels=None) -> None:
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"backend={backend!r} not allowed; choose one of {list(KERNEL_BACKENDS)}")
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if backend == "triton-interpret" and not interpret:
            raise ValueError(
                "backend='triton-interpret' needs TRITON_INTERPRET=1 set before triton is imported"
            )
        if backend == "cpu":
            cpu_library()  # one-line RuntimeError when no C compiler can build the kernels
        if backend == "triton" and (interpret or not torch.cuda.is_available()):
            raise ValueError("backend='triton' needs a CUDA device and TRITON_INTERPRET unset")
        self.schedule, self.backend, self.validate = schedule, backend, validate
        self.errors: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._kernels: dict[str, tuple[Any, Any]] = dict(kernels or {})
        self._by: dict[tuple[str, int], tuple[Instr, ...]] = {}
        for phase in ("prefill", "decode", "flush", "evict"):
            for i in schedule.select(phase):
                self._by[(phase, i.layer)] = self._by.get((phase, i.layer), ()) + (i,)

    def kernel(self, uri: str | None) -> tuple[Any, Any]:
        """(entry, reduce) jit functions of ``uri``, loaded once through the kernel cache."""
        if uri is None or uri not in self.schedule.kernels:
            raise ValueError(f"kernel_uri={uri!r} is not a kernel of this schedule")
        if uri not in self._kernels:

            self._kernels[uri] = load_kernel(KernelKey.from_json(dict(self.schedule.kernels[uri])))
        return self._kernels[uri]

    def record(self, op: str, err: float) -> None:
        self.errors[op] = max(self.errors.get(op, 0.0), float(err))

    def run(self, layer: Any, sched_layer: int, q, k, v, valid, scale) -> torch.Tensor:
        """One forward of ``layer``: decode (one valid token, stores filled) or prefill, then flush, evict."""
        B, Hq, T, _ = q.shape
        stores = layer.stores
        decode = T == 1 and bool(valid.all()) and all(s.tokens_seen > 0 for s in stores)
        ctx = Ctx(self, layer, q, k, v, valid, scale, q.new_empty(B, Hq, T, v.shape[-1]))
        for phase in ("decode" if decode else "prefill", "flush", "evict"):
            for instr in self._by.get((phase, sched_layer), ()):
                self.counts[instr.op] = self.counts.get(instr.op, 0) + 1
                HANDLERS[instr.op](ctx, instr)
        return ctx.out


# ---- handlers -------------------------------------------------------------------------------------
def _attend_ref(ctx: Ctx, instr: Instr) -> None:
    q, k, v, qi = ctx.heads(instr.group)
    store = ctx.layer.stores[instr.group]
    out = cpu_attend(store, q, k, v, ctx.scale) if ctx.interp.backend == "cpu" and instr.phase == "decode" else None
    ctx.put(qi, store.attend(q, k, v, ctx.valid, ctx.scale) if out is None else out)


def _append(ctx: Ctx, instr: Instr) -> None:
    q, k, v, _ = ctx.heads(instr.group)
    ctx.layer.stores[instr.group].append(k, v, q, ctx.valid)


def _push_residual(ctx: Ctx, instr: Instr) -> None:
    """Append the new tokens to a quant group's fp residual (the flush phase quantizes full groups)."""
    _, k, v, _ = ctx.heads(instr.group)
    store = ctx.layer.stores[instr.group]
    buf = store.buf
    if buf.lead is None:
        buf.lead = leading_pads(ctx.valid)
    buf.append_residual(k.to(buf.dtype), v.to(buf.dtype))
    store.tokens_seen += k.shape[2]


def _flush_quant(ctx: Ctx, instr: Instr) -> None:
    """Quantize the oldest residual groups once the residual holds ``residual + group`` tokens."""
    buf = ctx.layer.stores[instr.group].buf
    f = buf.pending()
    if f <= 0:
        return
    if ctx.interp.backend in ("torch", "cpu"):
        new = buf.quantize_ref(f)
    else:

        s = buf.s
        kx, vx = buf.k_res[:, :, :f], buf.v_res[:, :, :f]
        kernel = ctx.interp.kernel(instr.kernel_uri)[0]
        new = quantize_append(kx, vx, bits=s.bits, group=s.group, v_group=buf.vg, lead=buf.lead, start=buf.nq,
                              kernel=kernel, v_bits=s.vbits)  # fmt: skip
        if ctx.interp.validate:
            want = buf.quantize_ref(f)
            err = max((new[n].float() - want[n].float()).abs().max().item() for n in want)
            ctx.interp.record("flush_quant", err)
    buf.commit(new, f)


def _quant_tensors(buf, k_new: torch.Tensor) -> dict[str, torch.Tensor]:
    """The six KIVI tensors of ``buf`` (dense copies; zero-length before the first flush)."""
    if buf.nq:
        return _dense({n: getattr(buf, n) for n in buf.NAMES})
    B, Hg, _, D = k_new.shape
    dev, f16 = k_new.device, torch.float16
    kc = torch.zeros(B, Hg, 0, D * buf.s.bits // 8, dtype=torch.uint8, device=dev)
    return dict(k_codes=kc, v_codes=kc, k_scale=torch.zeros(B, Hg, 0, D, dtype=f16, device=dev),
                k_zero=torch.zeros(B, Hg, 0, D, dtype=f16, device=dev),
                v_scale=torch.zeros(B, Hg, 0, D // buf.vg, dtype=f16, device=dev),
                v_zero=torch.zeros(B, Hg, 0, D // buf.vg, dtype=f16, device=dev))  # fmt: skip


def _group_view(store, strategy, kv_heads, k_new, v_new):
    fmt = strategy.kernel_format()
    if fmt in ("quant", "quant_pos", "mikv"):
        buf = store.lo if fmt == "mikv" else store.buf
        t = _quant_tensors(buf, k_new)
        kt = torch.cat([buf.k_res, k_new.to(buf.dtype)], 2)
        vt = torch.cat([buf.v_res, v_new.to(buf.dtype)], 2)
        kw: dict = {}
        if fmt != "quant":  # positions of codes + residual; the new token is never masked
            pos = buf.pos.contiguous()
            t["pos"] = pos
            new = torch.full_like(pos[:, :, :1], ALWAYS_VALID, dtype=torch.int64).expand(-1, -1, k_new.shape[2])
            kw["tail_pos"] = torch.cat([pos[:, :, buf.nq :].long(), new], 2)
        if fmt == "mikv":
            hi = store.hi
            t.update(hi_k=hi.k.contiguous(), hi_v=hi.v.contiguous(), hi_pos=hi.pos.contiguous())
        return GroupView(fmt, kv_heads, t, bits=buf.s.bits, group=buf.s.group, v_group=buf.vg, k_tail=kt,
                         v_tail=vt, tail_pos0=buf.nq, v_bits=buf.s.vbits, **kw)  # fmt: skip
    return GroupView(fmt, kv_heads, _dense(store.tensors()), k_tail=k_new, v_tail=v_new)


def _dense(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous copies of capacity-buffer views: the Triton launchers take dense [B, H, N, ...]
    tensors (passing the buffers' batch/head strides to the kernels would avoid this copy)."""
    return {n: t.contiguous() for n, t in tensors.items()}


def _layer_lead(stores) -> torch.Tensor | None:
    for s in stores:
        lead = getattr(s, "lead", None)
        if lead is None and hasattr(s, "buf"):
            lead = s.buf.lead
        if lead is not None:
            return lead
    return None


def _attend_decode(ctx: Ctx, instr: Instr) -> None:
    """All kernel-served groups of the layer in one launch (uniform kernel, or the mixed one)."""

    layer, G = ctx.layer, ctx.layer.gqa
    served = instr.arg("groups")
    if ctx.interp.backend in ("torch", "cpu"):  # store references / C kernels: one head group per call
        for gi in served:
            _attend_ref(ctx, dataclasses.replace(instr, op="attend_ref", group=gi))
        return
    kv_heads = sorted(h for gi in served for h in layer.groups[gi].kv_heads)
    local = {h: i for i, h in enumerate(kv_heads)}  # layer KV head -> head of the launch
    q_idx = torch.tensor([h * G + j for h in kv_heads for j in range(G)], device=ctx.q.device)
    q = ctx.q.index_select(1, q_idx) if len(kv_heads) != layer.num_kv_heads else ctx.q
    views = []
    for gi in served:
        g = layer.groups[gi]
        kv = torch.tensor(g.kv_heads, device=ctx.k.device)
        views.append(_group_view(layer.stores[gi], g.strategy, tuple(local[h] for h in g.kv_heads),
                                 ctx.k.index_select(1, kv), ctx.v.index_select(1, kv)))  # fmt: skip
    lead = _layer_lead(layer.stores)
    uniform = len(views) == 1 and views[0].kv_heads == tuple(range(len(kv_heads)))
    if uniform and views[0].fmt not in MIXED_ONLY:
        v0, kernels = views[0], ctx.interp.kernel(instr.kernel_uri)
        t, kw = v0.tensors, dict(scale=ctx.scale, lead=lead, kernels=kernels)
        if v0.fmt == "quant":
            args = [t[n] for n in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")]
            out = decode_quant(q, *args, bits=v0.bits, group=v0.group, v_group=v0.v_group, k_tail=v0.k_tail,
                               v_tail=v0.v_tail, v_bits=v0.v_bits or v0.bits, **kw)  # fmt: skip
        elif v0.fmt == "fp8":
            out = decode_fp8(
                q, t["k"], t["v"], t["k_scale"], t["v_scale"], k_new=v0.k_tail, v_new=v0.v_tail, **kw
            )
        elif v0.fmt == "compact":
            out = decode_compact(q, t["k"], t["v"], t["pos"], k_new=v0.k_tail, v_new=v0.v_tail, **kw)
        else:
            out = decode_full(q, t["k"], t["v"], k_new=v0.k_tail, v_new=v0.v_tail, **kw)
    else:
        out = decode_mixed(q, views, scale=ctx.scale, lead=lead, kernels=ctx.interp.kernel(instr.kernel_uri))
    if ctx.interp.validate:
        for gi in served:
            gq, gk, gv, _ = ctx.heads(gi)
            want = layer.stores[gi].attend(gq, gk, gv, ctx.valid, ctx.scale)
            rows = [local[h] * G + j for h in layer.groups[gi].kv_heads for j in range(G)]
            got = out[:, rows]  # type: ignore[index]
            ctx.interp.record("attend_decode", (got.float() - want.float()).abs().max().item())
    if len(kv_heads) == layer.num_kv_heads:
        ctx.out.copy_(out.to(ctx.out.dtype))
    else:
        ctx.out.index_copy_(1, q_idx, out.to(ctx.out.dtype))


def _attend_scored(ctx: Ctx, instr: Instr) -> None:
    """An H2O group: decode attention over its compacted keys that also returns each key's attention
    mass, handed to the store (``observe``) for its next eviction."""

    q, k, v, qi = ctx.heads(instr.group)
    store = ctx.layer.stores[instr.group]
    t = _dense(store.tensors())
    args = (q, t["k"], t["v"], t["pos"])
    if ctx.interp.backend in ("torch", "cpu"):
        out, mass = ref.decode_compact_scored(*args, scale=ctx.scale, k_new=k, v_new=v)
    else:
        kernels = ctx.interp.kernel(instr.kernel_uri)
        out, mass = decode_compact_scored(*args, scale=ctx.scale, k_new=k, v_new=v, kernels=kernels)
        if ctx.interp.validate:
            _, want_mass = ref.decode_compact_scored(*args, scale=ctx.scale, k_new=k, v_new=v)
            want = store.attend(q, k, v, ctx.valid, ctx.scale)  # the store's own reference
            ctx.interp.record("attend_scored", (out.float() - want.float()).abs().max().item())
            ctx.interp.record("attend_scored_mass", (mass - want_mass).abs().max().item())
    store.observe(mass)
    ctx.put(qi, out)


HANDLERS: dict[str, Callable[[Ctx, Instr], None]] = {
    "attend_scored": _attend_scored,
    "attend_ref": _attend_ref,
    "append": _append,
    "push_residual": _push_residual,
    "flush_quant": _flush_quant,
    "attend_decode": _attend_decode,
}

# layer -> (interpreter, layer index in its schedule); filled by attach() (make_cache calls it)
_ATTACHED: weakref.WeakKeyDictionary[Any, tuple[Interpreter, int]] = weakref.WeakKeyDictionary()


def _layer_strategies(layer) -> list:
    row = [None] * layer.num_kv_heads
    for g in layer.groups:
        for h in g.kv_heads:
            row[h] = g.strategy
    return row


def attach(
    cache: Any, *, validate: bool = False, backend: str | None = None, kernels=None, plan: Any = None
) -> Interpreter:
    """Build one interpreter for every layer of a ``KVCompileCache`` (lowering its strategies).

    ``backend`` defaults to the cache's. With ``plan`` (the plan the cache was made from), the schedule
    is the plan's and the kernels are the sources it carries, hash-checked on load
    (``codegen.lower.load_plan_kernels``; a mismatch raises ``KernelSourceError``), so serving runs
    exactly what was compiled. ``kernels`` (uri -> (entry, reduce)) overrides individual kernels.
    """

    layers = list(cache.layers)
    rows = [_layer_strategies(la) for la in layers]
    if plan is not None:
        if plan.strategies() != rows:
            raise PlanError("attach: the cache's strategies are not the plan's")
        sched = lower(plan)
        if plan.schedule is not None and Schedule.from_json(plan.schedule, sched.kernels) != sched:
            raise PlanError("attach: the plan's schedule does not match its layers (stale or edited)")
        if (backend or cache.backend) not in ("torch", "cpu"):  # those run references / C kernels, no Triton
            kernels = {**load_plan_kernels(plan), **(kernels or {})}
    else:
        sched = lower_strategies(rows, head_dim=layers[0].head_dim, gqa=layers[0].gqa, dtype="float32")
    interp = Interpreter(sched, backend or cache.backend, validate=validate, kernels=kernels)
    for i, la in enumerate(layers):
        _ATTACHED[la] = (interp, i)
    return interp


def is_attached(layer: Any) -> bool:
    """Whether :func:`attach` gave ``layer`` an interpreter (then even backend "torch" runs the schedule)."""
    return layer in _ATTACHED


def run_layer(layer: Any, q, k, v, valid, scale) -> torch.Tensor:
    """Entry point from the runtime's attention function: the layer's schedule, attached once by
    ``make_cache`` (or :func:`attach`); serving never lowers a plan."""
    if layer not in _ATTACHED:
        raise RuntimeError(
            f"layer {layer.layer_idx}: backend {layer.backend!r} runs a schedule; build the cache with "
            "make_cache(plan, model) or call attach(cache) first"
        )
    interp, idx = _ATTACHED[layer]
    return interp.run(layer, idx, q, k, v, valid, scale)
