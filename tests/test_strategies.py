"""Registry-wide strategy tests: exact byte accounting, lossless equivalence, specs, validation.

Every registered strategy is covered through ``SMALL`` (small-budget instances so n=97 tokens
really compress); a newly registered name falls back to its default parameters.
"""

from __future__ import annotations

import pytest
import torch

from kvcompile.strategies import (
    ENGINE_ONLY,
    OUTSIDE_GRID,
    REGISTRY,
    Strategy,
    default_instances,
    from_spec,
    reference_attention,
)

B, G, SCALE = 2, 3, 0.125

SMALL: dict[str, Strategy] = {
    "full": REGISTRY["full"](),
    "fp8": REGISTRY["fp8"](),
    "quant": REGISTRY["quant"](bits=2, group=16, residual=8),
    "sink_window": REGISTRY["sink_window"](sinks=4, window=20),
    "heavy_hitter": REGISTRY["heavy_hitter"](budget=24, recent=8),
    "snapkv": REGISTRY["snapkv"](budget=20, obs_window=8, pool_kernel=5),
}


def small(name: str) -> Strategy:
    extra = {"think": {"keep_ratio": 0.25}, "compose": None, "mikv": None}
    if name in SMALL:
        return SMALL[name]
    if name in ("compose", "mikv"):
        sel = REGISTRY["snapkv"](budget=20, obs_window=8, pool_kernel=5)
        if name == "compose":
            return REGISTRY[name](select=sel, quant=REGISTRY["quant"](bits=4, group=16, residual=8))
        return REGISTRY[name](select=REGISTRY["heavy_hitter"](budget=24, recent=8))
    return REGISTRY[name](**(extra.get(name) or {}))


def make_inputs(n: int, hg: int, d: int, pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, hg, n, d, generator=g)
    v = torch.randn(B, hg, n, d, generator=g)
    q = torch.randn(B, hg * G, n, d, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :pad] = False
    return q, k, v, valid


def new_store(s: Strategy, hg: int, d: int, dtype: torch.dtype = torch.float32):
    return s.new_store(batch=B, num_heads=hg, head_dim=d, gqa=G, dtype=dtype, device=torch.device("cpu"))


def step(store, q, k, v, valid):
    out = store.attend(q, k, v, valid, SCALE)
    store.append(k, v, q, valid)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_nbytes_equals_bytes_for(name, dtype):
    s, hg, d, db = small(name), 2, 64, dtype.itemsize
    for n in (1, 8, 33, 64, 97):
        q, k, v, valid = (
            x.to(dtype) if x.is_floating_point() else x for x in make_inputs(n, hg, d, min(3, n - 1), n)
        )
        st = new_store(s, hg, d, dtype)
        out = step(st, q, k, v, valid)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert st.nbytes() == s.bytes_for(n, d, db) * B * hg, (name, n)
        assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors().values())
    # prefill 60 then 20 single-token decode steps: exact at every step
    q, k, v, valid = (x.to(dtype) if x.is_floating_point() else x for x in make_inputs(80, hg, d, 5, 1))
    st = new_store(s, hg, d, dtype)
    step(st, q[:, :, :60], k[:, :, :60], v[:, :, :60], valid[:, :60])
    for t in range(60, 80):
        step(st, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], valid[:, t : t + 1])
        assert st.nbytes() == s.bytes_for_seq(60, t + 1 - 60, d, db) * B * hg, (name, t)
    assert st.tokens_seen == 80
    assert s.reads_bytes_for(80, d, db) >= 0 and s.dequant_flops_per_token(d) >= 0


LOSSLESS = [
    REGISTRY["full"](),
    REGISTRY["quant"](bits=8, group=32, residual=10_000),
    REGISTRY["sink_window"](sinks=4, window=200),
    REGISTRY["heavy_hitter"](budget=300, recent=10),
    REGISTRY["snapkv"](budget=200, obs_window=8),
    REGISTRY["think"](keep_ratio=1.0),
]


@pytest.mark.parametrize("s", LOSSLESS, ids=lambda s: s.name)
@pytest.mark.parametrize("d", [64, 80])
def test_lossless_configs_match_reference_attention(s, d):
    """Configs that keep every token exactly must equal attention over the uncompressed K/V."""
    hg, n, pre = 2, 97, 90
    q, k, v, valid = make_inputs(n, hg, d, pad=6, seed=d)
    st = new_store(s, hg, d)
    out = step(st, q[:, :, :pre], k[:, :, :pre], v[:, :, :pre], valid[:, :pre])
    ref, _ = reference_attention(
        q[:, :, :pre], k[:, :, :pre], v[:, :, :pre], valid[:, None, :pre], SCALE, pre
    )
    real = valid[:, None, :pre, None]  # padding queries are undefined
    torch.testing.assert_close(out * real, ref * real, atol=2e-5, rtol=1e-4)
    for t in range(pre, n):
        out = step(st, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], valid[:, t : t + 1])
        ref, _ = reference_attention(
            q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], valid[:, None, : t + 1], SCALE
        )
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_spec_round_trip(name):
    s = small(name)
    assert from_spec(s.to_spec()) == s
    assert isinstance(s.kernel_format(), str) and s.kernel_format()
    assert s.paper and "arXiv" in s.paper or name == "full"


BAD = [
    ("fp8", {"headroom": 0.5}, "headroom"),
    ("quant", {"bits": 3}, "bits"),
    ("quant", {"group": 0}, "group"),
    ("quant", {"residual": -1}, "residual"),
    ("quant", {"v_group": 0}, "v_group"),
    ("sink_window", {"sinks": -1}, "sinks"),
    ("sink_window", {"window": 0}, "window"),
    ("heavy_hitter", {"budget": 0}, "budget"),
    ("heavy_hitter", {"budget": 8, "recent": 9}, "recent"),
    ("snapkv", {"budget": 0}, "budget"),
    ("snapkv", {"obs_window": 0}, "obs_window"),
    ("snapkv", {"pool_kernel": 4}, "pool_kernel"),
    ("snapkv", {"decode_window": 0}, "decode_window"),
    ("think", {"keep_ratio": 0.0}, "keep_ratio"),
    ("think", {"keep_ratio": 1.5}, "keep_ratio"),
    ("think", {"obs_window": 0}, "obs_window"),
    ("mikv", {"low_bits": 3}, "low_bits"),
]


@pytest.mark.parametrize("name,params,param", BAD, ids=lambda x: str(x))
def test_bad_params_raise_value_error_naming_param(name, params, param):
    if name not in REGISTRY:
        pytest.skip(f"{name} not registered")
    spec = {"name": name, **params}
    if name == "mikv":
        spec["select"] = {"name": "heavy_hitter", "budget": 16, "recent": 4}
    with pytest.raises(ValueError, match=param):
        from_spec(spec)


def test_validate_for_rejects_site_mismatch():
    with pytest.raises(ValueError, match="larger than context"):
        REGISTRY["sink_window"](sinks=4, window=1024).validate_for(head_dim=64, context=512)
    with pytest.raises(ValueError, match="larger than context"):
        REGISTRY["heavy_hitter"](budget=600, recent=8).validate_for(head_dim=64, context=512)
    with pytest.raises(ValueError, match="larger than context"):
        REGISTRY["snapkv"](budget=500, obs_window=32).validate_for(head_dim=64, context=512)
    with pytest.raises(ValueError, match="head_dim"):
        REGISTRY["quant"](bits=2).validate_for(head_dim=66)
    with pytest.raises(ValueError, match="v_group"):
        REGISTRY["quant"](bits=4, v_group=24).validate_for(head_dim=64)
    REGISTRY["quant"](bits=2).validate_for(head_dim=80, context=4096)  # 80 % 4 == 0: fine
    with pytest.raises(ValueError, match="unknown strategy"):
        from_spec({"name": "nope"})


def test_default_instances_cover_registry_and_validate():
    ctx = 4096
    insts = default_instances(ctx)
    names = {s.name for s in insts}
    assert names == set(REGISTRY) - ENGINE_ONLY - OUTSIDE_GRID
    assert len({s.to_spec().__repr__() for s in insts}) == len(insts)  # no duplicates
    full = REGISTRY["full"]().bytes_for(ctx, 64, 2)
    for s in insts:
        s.validate_for(head_dim=64, context=ctx)
        assert 0 < s.bytes_for(ctx, 64, 2) <= full * 1.01, s.label()
    ratios = sorted(s.bytes_for(ctx, 64, 2) / full for s in insts)
    assert ratios[0] < 0.1  # the grid reaches deep compression
