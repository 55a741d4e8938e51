"""The ``cpu`` backend's decode step: one head group's attention through ``codegen.cpu`` C kernels.

:func:`cpu_attend` reads a store's tensors in place (KIVI codes through their capacity buffers,
selection / full stores as fp32 rows) and returns ``None`` for stores it has no kernel for (fp8,
MiKV, H2O, model dtypes other than float32, a composition still in its prefill); the interpreter
then runs the store's torch reference. Output equals the store's ``attend`` up to float32
summation order (tests compare them).
"""

from __future__ import annotations

import torch

from ..codegen import cpu as ck
from ..strategies._select import SelectStore
from ..strategies.base import Store
from ..strategies.compose import ComposeStore
from ..strategies.fp8 import FP8Store
from ..strategies.full import FullStore
from ..strategies.quant import QuantStore


def cpu_library() -> object:
    """The compiled kernels (RuntimeError naming the reason when they cannot be built)."""
    return ck.library()


def cpu_attend(store: Store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Decode attention [B, Hg*G, 1, D] of one group over ``store`` plus the new token, or None."""
    if q.dtype != torch.float32 or q.device.type != "cpu" or q.shape[2] != 1:
        return None
    if isinstance(store, QuantStore) or (isinstance(store, ComposeStore) and store.sel is None):
        buf = store.buf
        if buf.n == 0 or buf.dtype != torch.float32 or buf.vg % (8 // buf.s.vbits):
            return None
        c = buf.capacity
        return ck.decode_kivi(
            q, c("k_codes"), c("k_scale"), c("k_zero"), c("v_codes"), c("v_scale"), c("v_zero"),
            buf.k_res, buf.v_res, k, v, bits=buf.s.bits, group=buf.s.group, v_group=buf.vg, nq=buf.nq,
            scale=scale, pos=c("pos") if buf.with_pos else None, lead=buf.lead, v_bits=buf.s.vbits,
        )  # fmt: skip
    if isinstance(store, SelectStore) and store.k is not None and not store.s.keeps_score:
        if store.s.observe != "none" and store.s.observe != "window":
            return None
        return ck.decode_dense(q, store.k, store.v, k, v, scale=scale, pos=store.pos)
    if isinstance(store, FP8Store) and store.k is not None:
        return ck.decode_fp8(q, store.k, store.v, store.k_scale, store.v_scale, k, v, scale=scale, lead=store.lead)
    if isinstance(store, FullStore) and store.k is not None and store.storage == torch.float32:
        return ck.decode_dense(q, store.k, store.v, k, v, scale=scale, lead=store.lead)
    return None
