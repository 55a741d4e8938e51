"""The contract every KV strategy and its runtime store follow.

A *strategy* is a frozen dataclass of parameters (it never holds tensors). For one layer, the KV
heads that share a strategy form a *head group*; ``strategy.new_store(...)`` allocates the group's
*store*, which owns the physical tensors (the real bytes) and implements the reference (torch)
behaviour:

* ``attend(q, k_new, v_new, valid_new, scale)`` — attention of the new queries over everything the
  store holds **plus** the new tokens (causal among the new tokens, in full precision: prefill
  attention is never computed over compressed keys, as in KIVI/SnapKV/H2O). Strategies that score
  tokens (H2O, SnapKV) observe the attention probabilities here.
* ``append(k_new, v_new, q_new, valid_new)`` — then fold the new tokens into storage (quantize,
  evict, compact). Called once per forward, after ``attend``.
* ``nbytes()`` — bytes of every tensor the store holds (codes, scales, residuals, positions, scores).
  Must equal ``strategy.bytes_for(tokens, ...) * batch * num_heads`` for a store that has seen
  ``tokens`` tokens per row (the strategy's accounting is exact, not an estimate).

Shapes (per group): ``q``: [B, Hg*G, T, D] where G = GQA ratio and query head ``j`` of the group
reads KV head ``j // G``; ``k_new``/``v_new``: [B, Hg, T, D]; ``valid_new``: [B, T] bool (False for
left padding); output: [B, Hg*G, T, Dv]. Keys arrive post-RoPE, so positions only matter for
bookkeeping (which tokens are kept), never for re-rotation.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch


@dataclasses.dataclass(frozen=True)
class Strategy(ABC):
    """Base class of all KV strategies. Subclasses are frozen dataclasses registered by name."""

    name: ClassVar[str]
    paper: ClassVar[str]  # citation of the method this implements

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:  # noqa: B027 - optional hook
        """Validate parameters; raise ``ValueError`` naming the parameter and its allowed range."""

    def validate_for(self, *, head_dim: int, context: int | None = None) -> None:  # noqa: B027
        """Validate against a concrete site (head_dim) and context; raise ``ValueError``."""

    @abstractmethod
    def bytes_for(self, tokens: int, head_dim: int, dtype_bytes: int) -> int:
        """Exact bytes one KV head holds for one sequence after ``tokens`` tokens (K + V + metadata)."""

    @abstractmethod
    def new_store(
        self, *, batch: int, num_heads: int, head_dim: int, gqa: int, dtype: torch.dtype, device: torch.device
    ) -> Store:
        """Allocate the runtime store of a head group (``num_heads`` KV heads sharing this strategy)."""

    # ---- helpers shared by all strategies ------------------------------------------------------
    def to_spec(self) -> dict[str, Any]:
        """The JSON form stored in plans: ``{"name": ..., **params}``."""
        spec: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            spec[f.name] = v.to_spec() if isinstance(v, Strategy) else v
        return spec

    def label(self) -> str:
        """Short human-readable label, e.g. ``quant(bits=2,group=32,residual=32)``."""
        vals = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        params = ",".join(f"{n}={v.label() if isinstance(v, Strategy) else v}" for n, v in vals)
        return f"{self.name}({params})" if params else self.name

    def short_label(self) -> str:
        """Compact label for tables (``snapkv:2016+q4``, ``q4/g32``); ``label()`` is the exact one.

        Default: the name, then the values of the fields that differ from their defaults. Two
        different strategies may share a short label; tables that use it print a legend.
        """
        changed = [
            getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default
        ]
        vals = ",".join(v.short_label() if isinstance(v, Strategy) else str(v) for v in changed)
        return f"{self.name}:{vals}" if vals else self.name

    def kernel_format(self) -> str:
        """Name of the storage format for kernel selection (overridden by strategies with kernels)."""
        return self.name

    # ---- cost-model hooks (planner roofline); defaults suit formats read once per decode step ------
    def bytes_for_seq(self, prefill: int, decoded: int, head_dim: int, dtype_bytes: int) -> int:
        """Exact bytes after one prefill of ``prefill`` tokens then ``decoded`` later tokens.

        Equals ``bytes_for(prefill + decoded)`` except for strategies that select only at prefill
        (SnapKV and compositions), whose ``bytes_for(n)`` means "after a prefill of n tokens".
        """
        return self.bytes_for(prefill + decoded, head_dim, dtype_bytes)

    def reads_bytes_for(self, tokens: int, head_dim: int, dtype_bytes: int) -> int:
        """Bytes one KV head reads per decode step at ``tokens`` tokens (default: everything it holds)."""
        return self.bytes_for(tokens, head_dim, dtype_bytes)

    def dequant_flops_per_token(self, head_dim: int) -> int:
        """Extra arithmetic per stored token per decode step to decode K and V (0 for plain floats)."""
        return 0


class Store(ABC):
    """Runtime storage of one head group of one layer. See the module docstring for the contract."""

    tokens_seen: int = 0  # logical tokens appended per row (including evicted ones)

    @abstractmethod
    def attend(
        self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, valid_new: torch.Tensor, scale: float
    ) -> torch.Tensor: ...

    @abstractmethod
    def append(
        self, k_new: torch.Tensor, v_new: torch.Tensor, q_new: torch.Tensor, valid_new: torch.Tensor
    ) -> None: ...

    @abstractmethod
    def nbytes(self) -> int: ...

    def batch_apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Map every per-row tensor through ``fn`` (beam search: reorder, select or repeat batch rows).

        Default: every tensor attribute (batch first, as all stores keep them) and every attribute
        that itself has ``batch_apply`` (a :class:`~kvcompile.strategies.quant.KiviBuffer`, a
        sub-store); a tuple of tensors is mapped element-wise.
        """
        for name, val in list(vars(self).items()):
            if isinstance(val, torch.Tensor):
                setattr(self, name, fn(val).contiguous())
            elif hasattr(val, "batch_apply"):
                val.batch_apply(fn)
            elif isinstance(val, tuple) and val and all(isinstance(t, torch.Tensor) for t in val):
                setattr(self, name, tuple(fn(t).contiguous() for t in val))

    def crop(self, tokens: int) -> None:
        """Forget the newest ``tokens`` tokens (assisted decoding, prompt lookup); formats that
        cannot restore their earlier state raise NotImplementedError naming why."""
        raise NotImplementedError(f"{type(self).__name__} cannot forget its newest tokens (crop)")

    def reserve(self, context: int) -> None:  # noqa: B027 - optional hook
        """Preallocate for a sequence of ``context`` tokens (the plan's); stores that grow in place use it."""

    def reserved_nbytes(self) -> int:
        """Bytes allocated (preallocated capacity included); equals :meth:`nbytes` unless a store reserves."""
        return self.nbytes()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The physical tensors held (name -> tensor), for inspection and accounting."""
        return {}


class SlotBuffer:
    """Named tensors [B, H, cap, ...] whose first ``n`` slots are live: allocated once for
    ``reserve(slots)`` at the first append and doubled only if a sequence outruns it, so appending a
    decode token writes one slot instead of copying the cache (``torch.cat``)."""

    def __init__(self) -> None:
        self.n = 0
        self.want = 0
        self.cap: dict[str, torch.Tensor] = {}

    def reserve(self, slots: int) -> None:
        self.want = max(self.want, int(slots))

    def append(self, **parts: torch.Tensor) -> None:
        """Write ``parts`` (each [B, H, T, ...]) into slots ``n .. n+T``."""
        T = next(iter(parts.values())).shape[2]
        need = self.n + T
        have = next(iter(self.cap.values())).shape[2] if self.cap else 0
        if need > have:
            size = max(need, self.want, 2 * have)
            for name, x in parts.items():
                t = x.new_empty(*x.shape[:2], size, *x.shape[3:])
                if name in self.cap and self.n:
                    t[:, :, : self.n] = self.cap[name][:, :, : self.n]
                self.cap[name] = t
        for name, x in parts.items():
            self.cap[name][:, :, self.n : need] = x
        self.n = need

    def view(self, name: str) -> torch.Tensor | None:
        t = self.cap.get(name)
        return None if t is None else t[:, :, : self.n]

    def crop(self, m: int) -> None:
        self.n -= m

    def batch_apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.cap = {name: fn(t).contiguous() for name, t in self.cap.items()}

    def reserved_nbytes(self) -> int:
        return tensor_bytes(*self.cap.values())


def tensor_bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    causal_new: int = 0,
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention with GQA, the reference every store and kernel is checked against.

    q: [B, Hq, T, D]; k: [B, Hk, N, D]; v: [B, Hk, N, Dv]; key_mask: [B, Hk, N] or [B, 1, N] bool
    (True = attend) or None; the last ``causal_new`` keys are the new tokens, to which query ``t``
    may attend only up to itself. Returns (out [B, Hq, T, Dv], probs [B, Hq, T, N] or None).
    Computed in float32.
    """
    B, Hq, T, _ = q.shape
    Hk, N = k.shape[1], k.shape[2]
    G = Hq // Hk
    qf = q.float().reshape(B, Hk, G * T, q.shape[-1])
    s = torch.matmul(qf, k.float().transpose(-1, -2)) * scale  # [B, Hk, G*T, N]
    s = s.view(B, Hk, G, T, N)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, :, None, None, :].expand(B, Hk, 1, 1, N), -math.inf)
    if causal_new:
        past = N - causal_new
        t = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(causal_new, device=q.device)[None, :]
        future = torch.zeros(T, N, dtype=torch.bool, device=q.device)
        future[:, past:] = j > (t + causal_new - T)
        s = s.masked_fill(future, -math.inf)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with every key masked (padding queries) give zeros
    out = torch.matmul(p.view(B, Hk, G * T, N), v.float()).view(B, Hk * G, T, v.shape[-1])
    probs = p.reshape(B, Hq, T, N) if return_probs else None
    return out.to(q.dtype), probs


def check_range(
    name: str, value: Any, lo: float | None = None, hi: float | None = None, allowed: Any = None
) -> None:
    """Raise ``ValueError`` naming the parameter when ``value`` is outside its range."""
    if allowed is not None and value not in allowed:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."  # values come from plans
        raise ValueError(f"{name}={shown} not allowed; choose one of {list(allowed)}")
    if lo is not None and value < lo:
        raise ValueError(f"{name}={value!r} must be >= {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}={value!r} must be <= {hi}")
