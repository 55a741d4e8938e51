"""Ahead-of-time compile check: build every kernel for an NVIDIA target without a GPU.

``python -m kvcompile.codegen.aot [ARCH]`` (``TRITON_INTERPRET`` must be unset) compiles each kernel
through Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for
``sm_ARCH`` (default 90, H100) at representative specializations, and prints ``{name: true | error}``
as JSON. It catches what the CPU interpreter accepts but the compiler rejects (for example a variable
whose tensor shape differs between the branches of an ``if``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def _p(t: str) -> str:
    return "*" + t


def _cases() -> list[tuple[str, Any, list[str], list[Any], dict[str, Any]]]:
    from . import _common, decode_compact, decode_mixed, decode_quant, quant_append

    f16, f32, u8, i64 = _p("fp16"), _p("fp32"), _p("u8"), _p("i64")
    tiles = dict(BLOCK_G=16, BLOCK_N=64, BLOCK_D=128)
    dense = [
        "q",
        "k",
        "v",
        "pos",
        "ks",
        "vs",
        "kt",
        "vt",
        "lead",
        "m",
        "l",
        "acc",
        "out",
        "Hg",
        "N",
        "Nt",
        "p0",
        "sc",
    ]
    dense_t = [
        f16,
        u8,
        u8,
        _p("i32"),
        f32,
        f32,
        f16,
        f16,
        i64,
        f32,
        f32,
        f32,
        f16,
        "i32",
        "i32",
        "i32",
        "i64",
    ]
    quant = [
        "q",
        "kc",
        "ks",
        "kz",
        "vc",
        "vs",
        "vz",
        "kt",
        "vt",
        "lead",
        "m",
        "l",
        "acc",
        "out",
        "Hg",
        "Nq",
        "Nt",
        "sc",
    ]
    b16 = _p("bf16")
    quant_t = [
        b16,
        u8,
        f16,
        f16,
        u8,
        f16,
        f16,
        b16,
        b16,
        i64,
        f32,
        f32,
        f32,
        b16,
        "i32",
        "i32",
        "i32",
        "fp32",
    ]
    i32 = _p("i32")
    quant6 = (u8, f16, f16, u8, f16, f16)
    slots = (
        (*quant6, u8, u8, u8, u8),  # quant (unused entries repeat the first)
        (u8, u8, f32, f32, u8, u8, u8, u8, u8, u8),  # fp8
        (f16, f16, i32, f16, f16, f16, f16, f16, f16, f16),  # compact
        (*quant6, i32, u8, u8, u8),  # quant_pos
        (*quant6, i32, f16, f16, i32),  # mikv
    )
    mixed = ["q", "table", "slots", "tails", "ints", "lead", "m", "l", "acc", "out", "Hkv", "sc"]
    mixed_t = [
        f16,
        _p("i32"),
        slots,
        ((f16, f16, f16),) * 3 + ((f16, f16, i64),) * 2,
        (("i32",) * 6,) * 5,
        i64,
        f32,
        f32,
        f32,
        f16,
        "i32",
        "fp32",
    ]
    spec = ((3, 4, 32, 128, 2), (1, 0, 0, 0, 0), (2, 0, 0, 0, 0), (4, 4, 32, 32, 4), (5, 2, 32, 32, 2))
    scored = ["q", "k", "v", "pos", "kt", "vt", "lead", "s", "m", "l", "acc", "out", "Hg", "N", "Nt", "sc"]
    scored_t = [f16, f16, f16, _p("i32"), f16, f16, i64, f32, f32, f32, f32, f16, "i32", "i32", "i32", "fp32"]
    append = ["k", "v", "kc", "ks", "kz", "vc", "vs", "vz", "lead", "n", "start", "Hg"]
    append_t = [f16, f16, u8, f16, f16, u8, f16, f16, i64, "i32", "i32", "i32"]
    return [
        ("decode_fp8", decode_compact._decode_dense_kernel, dense, [*dense_t, "fp32"],
         dict(FMT=1, D=128, G=4, HAS_LEAD=True, NUM_SPLITS=4, **tiles)),
        ("decode_quant_b2_hd80", decode_quant._decode_quant_kernel, quant, quant_t,
         dict(D=80, G=3, BITS=2, GROUP=32, V_GROUP=16, HAS_LEAD=True, V_BITS=4, NUM_SPLITS=1, **tiles)),
        ("decode_compact_scored", decode_compact._decode_scored_kernel, scored, scored_t,
         dict(D=64, G=3, HAS_LEAD=False, NUM_SPLITS=2, **tiles)),
        ("reduce_splits", _common._reduce_splits_kernel, ["m", "l", "acc", "out", "H"],
         [f32, f32, f32, f16, "i32"], dict(D=128, G=4, NUM_SPLITS=8, BLOCK_G=16, BLOCK_D=128)),
        ("quant_append_b4", quant_append._quant_pack_kernel, append, append_t,
         dict(D=128, BITS=4, GROUP=32, V_GROUP=32, HAS_LEAD=True, BLOCK_T=32, BLOCK_B=64, V_BITS=2, V_BLOCK_B=32)),
        ("decode_mixed", decode_mixed._decode_mixed_kernel, mixed, mixed_t,
         dict(SPEC=spec, NUM_SLOTS=5, D=128, G=4, HAS_LEAD=True, NUM_SPLITS=4, **tiles)),
    ]  # fmt: skip


def compile_check(arch: int = 90) -> dict[str, Any]:
    """``{kernel: True | "error message"}`` after compiling each case to a cubin for ``sm_<arch>``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (kernels must be real JIT functions)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out: dict[str, Any] = {}
    for name, fn, names, types, consts in _cases():
        if len(names) != len(types):
            raise ValueError(f"{name}: {len(names)} argument names for {len(types)} types")
        sig = dict(zip(fn.arg_names, types, strict=False))  # runtime arguments come first
        sig.update({k: "constexpr" for k in consts})
        pos = list(sig)
        src = ASTSource(fn=fn, signature=sig, constexprs={(pos.index(k),): v for k, v in consts.items()})
        try:
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
            out[name] = bool(k.asm.get("cubin"))
        except Exception as e:  # report every failure, not only the first
            out[name] = f"{type(e).__name__}: {str(e)[:600]}"
    return out


if __name__ == "__main__":
    res = compile_check(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
    print(json.dumps(res))
    sys.exit(0 if all(v is True for v in res.values()) else 1)
