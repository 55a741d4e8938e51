"""``FORMATS[name]``: one home per storage format the kernels serve (plain data, no triton).

A strategy names its storage format (``Strategy.kernel_format()``); everything codegen needs to know
about that format lives in its :class:`Format` record: the id the mixed launch branches on, the
store tensors a slot passes (in kernel order), whether the slot carries KIVI parameters or position
masks, and which single-format kernel serves it alone. ``keys``, ``_common`` and ``decode_mixed``
derive their tables from here; ``README.md`` has the recipe for adding a format.
"""

from __future__ import annotations

import dataclasses

QUANT6 = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")


@dataclasses.dataclass(frozen=True, slots=True)
class Format:
    """One storage format (see module docstring)."""

    name: str
    fid: int  # SPEC[i][0] in the mixed kernel
    tensors: tuple[str, ...]  # slot tensors in kernel order (at most 10)
    quant: bool = False  # the slot carries (bits, group, v_group, residual, v_bits)
    positions: bool = False  # main and tail tokens are masked by stored positions
    uniform_kind: str | None = None  # the single-format kernel kind (None: always the mixed launch)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("full", 0, ("k", "v"), uniform_kind="decode_full"),
        Format("fp8", 1, ("k", "v", "k_scale", "v_scale"), uniform_kind="decode_fp8"),
        Format("compact", 2, ("k", "v", "pos"), uniform_kind="decode_compact"),
        Format("quant", 3, QUANT6, quant=True, uniform_kind="decode_quant"),
        Format("quant_pos", 4, (*QUANT6, "pos"), quant=True, positions=True),
        Format("mikv", 5, (*QUANT6, "pos", "hi_k", "hi_v", "hi_pos"), quant=True, positions=True),
    )
}
MAX_SLOT_TENSORS = 10
