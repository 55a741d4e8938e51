"""Property tests (hypothesis) of the plan boundary: generated plans round-trip exactly, satisfy their
invariants, and any mutation of a plan file gives a PlanError or a valid plan — never another exception."""

from __future__ import annotations

import hashlib
import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvcompile import load  # noqa: E402
from kvcompile.plan import LayerPlan, ModelRef, Plan, PlanConfig, PlanError, SiteRef, TargetRef  # noqa: E402
from kvcompile.strategies import from_spec  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# strategy specs valid for head_dim 64 at context >= 512
SPECS = st.one_of(
    st.just({"name": "full", "dtype": "model"}),
    st.builds(lambda h: {"name": "fp8", "headroom": h}, st.floats(1.0, 100.0)),
    st.builds(lambda b, g: {"name": "quant", "bits": b, "group": g, "residual": g, "v_group": None},
              st.sampled_from([2, 4, 8]), st.sampled_from([16, 32])),  # fmt: skip
    st.builds(lambda s, w: {"name": "sink_window", "sinks": s, "window": w}, st.integers(0, 8), st.integers(1, 200)),
    st.builds(lambda r: {"name": "think", "keep_ratio": r, "obs_window": 32}, st.floats(0.05, 1.0)),
)


@st.composite
def plans(draw) -> Plan:
    layers = draw(st.integers(1, 4))
    kv = draw(st.integers(1, 4))
    gqa = draw(st.integers(1, 3))
    sites = [SiteRef(layer=i, module_path=f"model.layers.{i}.self_attn", num_q_heads=kv * gqa, num_kv_heads=kv,
                     head_dim=64, v_head_dim=64) for i in range(layers)]  # fmt: skip
    model = ModelRef(
        name=draw(st.text(min_size=1, max_size=20)), arch="LlamaForCausalLM", model_type="llama",
        fingerprint="f" * 20, dtype=draw(st.sampled_from(["float32", "bfloat16"])), num_params=10**6,
        param_bytes=4 * 10**6, on_meta=draw(st.booleans()), sites=sites,
    )  # fmt: skip
    heads = [LayerPlan(layer=i, heads=[from_spec(draw(SPECS)).to_spec() for _ in range(kv)]) for i in range(layers)]
    config = PlanConfig(context=draw(st.integers(512, 8192)), batch=draw(st.integers(1, 8)))
    target = TargetRef(name="h100-sxm", gpus=1, memory_bytes=80 * 2**30, memory_bandwidth=3.35e12)
    plan = Plan(model=model, target=target, config=config, layers=heads, notes=[draw(st.text(max_size=30))])
    pred = {"kv_bytes_at_context": plan.predicted_kv_bytes(config.context, config.batch),
            "decode_step_s": draw(st.floats(0, 1))}  # fmt: skip
    return plan.model_copy(update={"predicted": pred}).sealed()


@SETTINGS
@given(plan=plans())
def test_round_trip_and_invariants(plan, tmp_path):
    path = plan.save(tmp_path / "p.kvplan")
    back = load(path)
    assert back == plan and back.to_json() == plan.to_json()
    strategies = back.verify()
    assert [len(r) for r in strategies] == [s.num_kv_heads for s in back.model.sites]
    assert back.predicted_kv_bytes(back.config.context, back.config.batch) == back.predicted["kv_bytes_at_context"]


def _rehash(raw):
    body = json.dumps({k: v for k, v in raw.items() if k != "content_hash"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                      st.text(max_size=8))  # fmt: skip


@SETTINGS
@given(plan=plans(), data=st.data())
def test_any_mutation_is_plan_error_or_valid_plan(plan, data, tmp_path):
    raw = json.loads(plan.to_json())
    node, key = raw, None
    path = []
    while True:  # walk to a random node
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys or data.draw(st.booleans()):
            break
        key = data.draw(st.sampled_from(keys))
        path.append((node, key))
        node = node[key]
    if path:
        parent, key = path[-1]
        parent[key] = data.draw(st.one_of(JSON_LEAF, st.lists(JSON_LEAF, max_size=3),
                                          st.dictionaries(st.text(max_size=5), JSON_LEAF, max_size=3)))  # fmt: skip
    if data.draw(st.booleans()):
        raw["content_hash"] = _rehash(raw)
    text = json.dumps(raw)  # NaN / Infinity become their non-JSON tokens, as an attacker would write them
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(text)))
        text = text[:cut] + data.draw(st.text(max_size=4)) + text[cut:]
    p = tmp_path / "m.kvplan"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        back = load(p)
    except PlanError as e:
        assert "\n" not in str(e)
        return
    back.verify()  # accepted: every invariant holds
    assert back.compute_hash() == back.content_hash
    from kvcompile.report import render_inspect

    render_inspect(back)
