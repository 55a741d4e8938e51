"""KernelKey uris, rendered sources, the content-hashed kernel cache (atomic write, reuse, refusal)."""

from __future__ import annotations

import threading

import pytest
import torch

from kvcompile.codegen import cache as kc
from kvcompile.codegen import reference as ref
from kvcompile.codegen.decode_quant import decode_quant
from kvcompile.codegen.keys import KernelKey, Slot


@pytest.fixture
def kdir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE_DIR", str(tmp_path))
    kc.clear_memory_cache()
    yield tmp_path / "kernels"
    kc.clear_memory_cache()


QKEY = KernelKey("decode_quant", 64, 3, "float32", bits=4, group=32, v_group=64, residual=32)


def test_uri_is_readable_and_stable():
    assert QKEY.uri() == "decode_quant_hd64_b4_g32_gqa3_r32_f32"
    assert KernelKey("decode_fp8", 128, 4, "bfloat16").uri() == "decode_fp8_hd128_gqa4_bf16"
    assert KernelKey("quant_append", 80, 1, "float16", bits=2, group=16, v_group=40).uri() == (
        "quant_append_hd80_b2_g16_vg40_f16"
    )
    mixed = KernelKey(
        "decode_mixed", 64, 3, slots=(Slot("quant", 2, 32, 64, 32), Slot("full"), Slot("compact"))
    )
    assert mixed.uri() == "decode_mixed_hd64_gqa3_s-q2g32v64r32-full-compact_f32"
    assert KernelKey.from_json(mixed.to_json()) == mixed
    assert hash(KernelKey.from_json(QKEY.to_json())) == hash(QKEY)


@pytest.mark.parametrize(
    "bad",
    [
        dict(kind="decode_int3", head_dim=64),
        dict(kind="decode_quant", head_dim=64, bits=3),
        dict(kind="decode_full", head_dim=64, bits=4),
        dict(kind="decode_mixed", head_dim=64),
        dict(kind="decode_full", head_dim=64, dtype="int8"),
    ],
)
def test_bad_keys_are_rejected(bad):
    with pytest.raises(ValueError):
        KernelKey(**bad)


def test_render_is_deterministic_and_specific():
    src = kc.render(QKEY)
    assert src == kc.render(QKEY)
    assert kc.sha256(src) != kc.sha256(
        kc.render(KernelKey("decode_quant", 64, 3, bits=2, group=32, residual=32))
    )
    compile(src, QKEY.uri(), "exec")  # valid Python
    assert "def _decode_quant_kernel(" in src and "def _quant_tokens(" in src and "def _online_update(" in src
    assert QKEY.uri() in src


def test_cache_writes_atomically_reuses_and_repairs(kdir):
    main, red = kc.load_kernel(QKEY)
    src = kc.render(QKEY)
    files = sorted(p.name for p in kdir.iterdir())
    name = f"{QKEY.uri()}-{kc.sha256(src)[:16]}.py"
    assert files == [name, name + ".lock"]  # no temp file left behind
    assert (kdir / name).read_text() == src
    assert kc.load_kernel(QKEY) == (main, red)  # imported once per process
    # a cached file whose content no longer matches its name is rewritten, never imported
    kc.clear_memory_cache()
    (kdir / name).write_text(src.replace("tl.exp2", "tl.exp"))
    kc.load_kernel(QKEY)
    assert (kdir / name).read_text() == src


def test_kernel_loaded_from_cache_computes_the_reference(kdir):
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 9, 1, 64, generator=g),
        torch.randn(1, 3, 64, 64, generator=g),
        torch.randn(1, 3, 64, 64, generator=g),
    )
    kcodes, ks, kz = ref.quantize_keys(k, 4, 32)
    vcodes, vs, vz = ref.quantize_values(v, 4, 64)
    args = (q, kcodes, ks, kz, vcodes, vs, vz)
    out = decode_quant(*args, bits=4, group=32, v_group=64, kernels=kc.load_kernel(QKEY))
    expect = ref.decode_quant(*args, bits=4, group=32, v_group=64)
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=2e-5)


def test_hash_mismatch_is_refused(kdir):
    src = kc.render(QKEY)
    digest = kc.sha256(src)
    with pytest.raises(kc.KernelSourceError, match="does not match"):
        kc.load_source(QKEY.uri(), src + "\n# edited\n", digest)
    with pytest.raises(kc.KernelSourceError):
        kc.load_kernel(QKEY, src, "0" * 64)
    other = KernelKey("decode_full", 64, 3)
    with pytest.raises(kc.KernelSourceError, match="is for"):
        kc.load_kernel(QKEY, kc.render(other), kc.sha256(kc.render(other)))
    assert not kdir.exists() or not any(
        p.suffix == ".py" and "edited" in p.read_text() for p in kdir.iterdir()
    )


def test_concurrent_loads_build_once(kdir):
    key = KernelKey("decode_compact", 80, 3)
    results, errors = [], []

    def work():
        try:
            results.append(kc.load_kernel(key))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and all(r == results[0] for r in results)
    assert len([p for p in kdir.iterdir() if p.suffix == ".py"]) == 1
