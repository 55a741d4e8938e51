"""Run a plan with tensor parallelism on ``torch.distributed``: each rank holds only its KV heads.

Sharding is transformers' own: ``from_pretrained(..., tp_plan="auto")`` with a process group
initialised (gloo on CPU, NCCL on GPU) applies the model's ``base_model_tp_plan`` (Llama: q/k/v and
gate/up column-wise, o/down row-wise, with the all-reduces) through DTensor. Checked on CPU/gloo with
transformers 5.23: in the attention function rank ``r`` of ``t`` sees ``Hq/t`` query heads and the
``H/t`` KV heads ``[r*H/t, (r+1)*H/t)`` as plain tensors. kvcompile therefore re-implements no
sharding: it gives each rank a :class:`~kvcompile.runtime.KVCompileCache` built from the rank's
slice of the plan (:func:`shard_plan`), so a mixed plan stores every KV head in its own format on the
rank that owns it. The head-to-rank map is :func:`rank_heads`, the same contiguous split the
solver (``kvcompile.solve.parallel``) assumes; with ``t > H`` heads would be replicated, which
transformers' TP plan does not support (it needs ``H % t == 0``), so this module rejects it.

Host tier. Groups the plan places in host memory (``plan.placement``, from the ``place`` pass) live
in a second memory pool: :class:`HostTierLayer` keeps their stores on ``host_device`` between steps,
copies them to the compute device right before the layer's attention and back after it, and counts
the bytes moved each way (``bytes_to_device`` / ``bytes_to_host``: the stores' KV bytes, ``nbytes()``;
a few bytes of row bookkeeping such as left-padding counts move along uncounted). On a CPU-only
machine both pools are CPU memory, so the copies are real but the speed is not the PCIe link's; the
byte counts are the quantities the cost model charges. The whole store is moved both ways (a GPU
implementation would write back only the appended tokens).

Example (see ``examples/torchrun_smollm2.py``)
-------
>>> torch.distributed.init_process_group("gloo")                      # doctest: +SKIP
>>> model = load_tp_model(model_dir)                                   # doctest: +SKIP
>>> cache = make_rank_cache(plan, model)                                # doctest: +SKIP
>>> model.generate(ids, cache=cache, max_new_tokens=8)       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch

from ..plan import LayerPlan, Plan, PlanError, SiteRef
from ..strategies import Store
from .attention import ATTN_IMPLEMENTATION, register
from .cache import KVCompileCache, KVCompileLayer
from .interpreter import attach
from .validate import check_plan


def rank_heads(num_kv_heads: int, world: int) -> list[list[int]]:
    """KV heads of each rank: contiguous shards ``[r*H/t, (r+1)*H/t)`` (column-wise k/v projections)."""
    if world <= 0 or num_kv_heads % world:
        raise ValueError(
            f"world={world}: tensor-parallel execution needs the {num_kv_heads} KV heads to divide evenly"
        )
    per = num_kv_heads // world
    return [list(range(r * per, (r + 1) * per)) for r in range(world)]


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is None or world is None:
        if not torch.distributed.is_initialized():
            raise ValueError("rank/world not given and torch.distributed is not initialised")
        rank = torch.distributed.get_rank() if rank is None else rank
        world = torch.distributed.get_world_size() if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, {world})")
    return rank, world


def shard_plan(plan: Plan, rank: int, world: int) -> Plan:
    """The sub-plan of one rank: its KV heads' strategies and its query heads, everything else equal.

    ``shard_plan(p, r, t).predicted_kv_bytes(n)`` is the rank's share of ``p.predicted_kv_bytes(n)``.
    """
    sites, layers = [], []
    for site, lp in zip(plan.model.sites, plan.layers, strict=True):
        heads = rank_heads(site.num_kv_heads, world)[rank]
        sites.append(site.model_copy(update={
            "num_kv_heads": len(heads), "num_q_heads": site.num_q_heads // world}))  # fmt: skip
        layers.append(LayerPlan(layer=lp.layer, heads=[lp.heads[h] for h in heads]))
    model = plan.model.model_copy(update={"sites": [SiteRef(**s.model_dump()) for s in sites]})
    notes = [*plan.notes, f"tensor-parallel shard {rank} of {world}"]
    return plan.model_copy(update={"model": model, "layers": layers, "notes": notes}).sealed()


def host_heads(plan: Plan) -> set[tuple[int, int]]:
    """(layer, kv_head) pairs the plan's placement puts in host memory (empty without a placement)."""
    out: set[tuple[int, int]] = set()
    for row in (plan.placement or {}).get("placement", []):
        for g in row["groups"]:
            if g["where"] == "host":
                out.update((row["layer"], h) for h in g["heads"])
    return out


def _move(obj: Any, device: torch.device, seen: set[int] | None = None) -> None:
    """Copy every tensor reachable from a store's attributes (nested stores and buffers too) to ``device``."""
    seen = set() if seen is None else seen
    if id(obj) in seen or not hasattr(obj, "__dict__"):
        return
    seen.add(id(obj))
    for name, value in list(vars(obj).items()):
        if isinstance(value, torch.Tensor):
            setattr(obj, name, value.to(device, copy=True))
        elif isinstance(value, list | tuple):
            for v in value:
                _move(v, device, seen)
        elif value is not None and not isinstance(value, torch.dtype | torch.device | str | int | float):
            _move(value, device, seen)


class HostTierLayer(KVCompileLayer):
    """A layer some of whose head groups live in the host pool between decode steps (module docstring)."""

    def __init__(
        self, base: KVCompileLayer, host_groups: Iterable[int], host_device: torch.device, owner: TieredCache
    ) -> None:
        vars(self).update(vars(base))
        self.owner = owner
        self.host_groups = tuple(sorted(host_groups))
        self.host_device = torch.device(host_device)
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        self.staged = False

    def fetch(self) -> None:
        """Copy the host-tier stores to the compute device (before this layer's attention)."""
        stores = cast("list[Store]", self.stores)  # allocated at the layer's first update()
        for i in self.host_groups:
            self.bytes_to_device += stores[i].nbytes()
            _move(stores[i], self.device)
        self.staged = True

    def evict(self) -> None:
        """Copy them back into the host pool (after this layer's attention)."""
        if self.staged:
            stores = cast("list[Store]", self.stores)
            for i in self.host_groups:
                self.bytes_to_host += stores[i].nbytes()
                _move(stores[i], self.host_device)
            self.staged = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        out = super().update(key_states, value_states, *args, **kwargs)
        self.owner.evict_staged()  # the previous host layer's attention has run by now
        self.fetch()
        self.owner.staged_layer = self
        return out


class TieredCache(KVCompileCache):
    """A KVCompileCache whose host-placed groups live in a second pool; counts the bytes moved."""

    staged_layer: HostTierLayer | None = None

    def evict_staged(self) -> None:
        if self.staged_layer is not None:
            self.staged_layer.evict()
            self.staged_layer = None

    def bytes_moved(self) -> dict[str, int]:
        """Host-to-device and device-to-host bytes moved so far, summed over host-tier layers."""
        tiers = [la for la in self.layers if isinstance(la, HostTierLayer)]
        return {
            "to_device": sum(la.bytes_to_device for la in tiers),
            "to_host": sum(la.bytes_to_host for la in tiers),
        }

    def host_nbytes(self) -> int:
        """Bytes currently held in the host pool."""
        self.evict_staged()
        return sum(
            self.layers[la.layer_idx].stores[i].nbytes()  # type: ignore[index,misc]  # la.stores is not None
            for la in self.layers
            if isinstance(la, HostTierLayer) and la.stores
            for i in la.host_groups
        )


def make_rank_cache(
    plan: Plan,
    model: Any,
    *,
    rank: int | None = None,
    world: int | None = None,
    host_device: str | torch.device | None = None,
    backend: str = "torch",
) -> KVCompileCache:
    """The cache of one tensor-parallel rank: the rank's KV heads of ``plan``, in their formats.

    ``model`` is the (sharded) model of this rank; the whole plan is checked against its config
    (which keeps the unsharded head counts) before the slice is taken. Host-placed groups (from
    ``plan.placement``) go to a :class:`TieredCache` whose host pool is ``host_device`` (default CPU).
    Side effect as :func:`kvcompile.runtime.make_cache`: the model's attention implementation becomes
    ``"kvcompile"``.
    """
    rank, world = _rank_world(rank, world)
    check_plan(plan, model)  # the whole plan against the (unsharded) config; raises PlanError
    cfg = model.config
    q_heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    if q_heads % world:
        raise PlanError(f"world={world}: {q_heads} query heads do not split evenly")
    mine = rank_heads(kv_heads, world)[rank]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    shard = shard_plan(plan, rank, world)
    sub = shard.strategies()
    register()
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    hosted = host_heads(plan)
    cls = TieredCache if hosted else KVCompileCache
    cache = cls(sub, head_dim=head_dim, gqa=q_heads // kv_heads, backend=backend)
    cache.plan_shard = shard  # the rank's sub-plan: shard.predicted_kv_bytes(n) == cache.nbytes()
    if hosted:
        pool = torch.device(host_device or "cpu")
        for i, layer in enumerate(cache.layers):
            groups = [
                g for g, grp in enumerate(layer.groups) if all((i, mine[h]) in hosted for h in grp.kv_heads)
            ]
            if groups:
                cache.layers[i] = HostTierLayer(layer, groups, pool, cast(TieredCache, cache))
    if backend != "torch":
        attach(cache)  # the shard's schedule, lowered once here (serving never lowers)
    return cache


def load_tp_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa") -> Any:
    """Load an HF checkpoint sharded over the current process group (transformers ``tp_plan="auto"``)."""
    from transformers import AutoModelForCausalLM

    if not torch.distributed.is_initialized():
        raise ValueError("initialise torch.distributed first (torchrun + init_process_group)")
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, tp_plan="auto", attn_implementation=attn
    )
    model.eval()
    return model


@dataclasses.dataclass(frozen=True)
class RankReport:
    """What one rank reports after generation (JSON-able via ``dataclasses.asdict``)."""

    rank: int
    world: int
    kv_heads: list[int]
    tokens: list[list[int]]
    cache_nbytes: int
    predicted_nbytes: int
    seq_length: int
    bytes_moved: dict[str, int]
