"""The TP x placement x batch solver on hand-checkable instances, and the place pass on meta configs.

Llama-3-70B numbers used by hand below: 80 layers, 8 KV heads, head_dim 128, hidden 8192,
intermediate 28672, vocab 128256, 64 query heads, ~70.6e9 params in bf16 (141.2 GB). An fp16 KV head
holds 2 (K, V) * 128 * 2 bytes = 512 bytes per token. H100 SXM: 80 GiB = 85.9e9 bytes, 3.35 TB/s.
"""

from __future__ import annotations

import itertools
import math

import pytest

from kvcompile.solve.parallel import ParallelInfeasible, ParallelProblem, rank_heads, solve_parallel

GiB = 2**30
H100 = dict(
    memory_bytes=80 * GiB,
    memory_bandwidth=3.35e12,
    flops=989.4e12,
    host_link_bandwidth=64e9,
    interconnect_bandwidth=450e9,
    interconnect_latency_s=3e-6,
)
L70 = dict(
    layers=80,
    kv_heads=8,
    num_q_heads=64,
    head_dim=128,
    hidden_size=8192,
    intermediate_size=28672,
    vocab_size=128256,
    num_params=70_600_000_000,
    param_bytes=141_200_000_000,
)


def llama70(context: int, **kw) -> ParallelProblem:
    return ParallelProblem.uniform(head_bytes=512 * context, context=context, **{**H100, **L70, **kw})


def act(t: int, batch: int) -> int:
    """Activations per GPU (module docstring): a 2048-token prefill chunk + per-sequence row + fp32 logits."""
    row = 4 * 8192 + 2 * 28672 // t
    return 2048 * row * 2 + batch * (row * 2 + 128256 * 4)


def test_min_tp_that_fits_70b_matches_hand_computation():
    reserve = int(0.05 * 80 * GiB)
    for context in (8192, 131072):
        # per GPU, batch 1, all KV in HBM: weights/t + 80 layers * (8/t heads) * 512 B * context + act + rsv
        need = {t: 141.2e9 / t + 80 * (8 // t) * 512 * context + act(t, 1) + reserve for t in (1, 2, 4, 8)}
        hand = min(t for t in (1, 2, 4, 8) if need[t] <= 80 * GiB)
        for gpus in (1, 2, 4, 8):
            p = llama70(context, gpus=gpus, objective="min-memory", allow_host=False)
            if hand > gpus:
                with pytest.raises(ParallelInfeasible, match="TP=1: weights 141.2 GB"):
                    solve_parallel(p)
                continue
            sol = solve_parallel(p)
            fits = [c["tp"] for c in sol.candidates if c["fits"]]
            assert min(fits) == hand, (context, gpus, sol.candidates)
            assert sol.tp == hand  # min-memory uses the fewest GPUs that fit
            assert sol.per_gpu["kv"] == 80 * (8 // hand) * 512 * context
    # written out: at 8k TP=2 fits (70.6 + 1.3 + ~4.6 GB), at 128k TP=2 needs 70.6 + 21.5 > 85.9 GB -> TP=4
    assert [min(t for t in (1, 2, 4, 8) if 141.2e9 / t + 80 * (8 // t) * 512 * c + 4.6e9 <= 80 * GiB)
            for c in (8192, 131072)] == [2, 4]  # fmt: skip


def test_max_batch_is_the_hbm_capacity():
    p = llama70(8192, gpus=4, tp_degrees=(4,), allow_host=False)
    sol = solve_parallel(p)
    room = 80 * GiB - 141.2e9 / 4 - act(4, 0) - int(0.05 * 80 * GiB)
    per_seq = 80 * 2 * 512 * 8192 + act(4, 1) - act(4, 0)
    assert sol.tp == 4 and sol.batch == math.floor(room / per_seq)
    assert "HBM capacity" in sol.binding
    # tokens/s = batch / step, step = 80 * max(weights/4/80 + KV/80, compute) / bandwidth + all-reduces
    b = sol.batch
    hbm = (141.2e9 / 4 / 80 + b * 2 * 512 * 8192) / 3.35e12
    layer = max(hbm, b * (2 * 70.6e9 / 4 / 80 + 4 * 16 * 128 * 8192) / 989.4e12)
    comm = 2 * 80 * (2 * 3 / 4 * b * 8192 * 2 / 450e9 + 3e-6)
    assert sol.step_time_s == pytest.approx(80 * layer + comm, rel=1e-6)
    assert sol.tokens_per_s == pytest.approx(b / (80 * layer + comm), rel=1e-6)


def test_replication_counted_when_tp_exceeds_kv_heads():
    kw = dict(layers=4, kv_heads=2, num_q_heads=16, head_dim=64, hidden_size=1024, intermediate_size=4096,
              vocab_size=1000, num_params=10**8, param_bytes=2 * 10**8, context=1000, memory_bytes=10**10,
              memory_bandwidth=1e12, flops=1e14, host_link_bandwidth=1e10, interconnect_bandwidth=1e11,
              interconnect_latency_s=0.0, objective="min-latency", batch=3)  # fmt: skip
    assert rank_heads(2, 8) == [[0], [0], [0], [0], [1], [1], [1], [1]]
    assert rank_heads(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for t in (1, 2, 8):
        sol = solve_parallel(ParallelProblem.uniform(head_bytes=7000, gpus=8, tp_degrees=(t,), **kw))
        heads_per_gpu = max(1, 2 // t)
        assert sol.per_gpu["kv"] == 4 * heads_per_gpu * 7000 * 3  # one full head per GPU at TP 8, not 2/8
        assert sol.kv_copies == max(t, 2)
        assert sol.per_gpu["weights"] == 2 * 10**8 // t


def test_host_placement_only_when_hbm_is_short():
    reserve = int(0.05 * 80 * GiB)
    for context in (8192, 32768):
        sol = solve_parallel(llama70(context, gpus=2, objective="min-latency"))
        assert sol.tp == 2 and sol.host_kv_bytes == 0 and sol.host_layers == []
    sol = solve_parallel(llama70(131072, gpus=2, objective="min-latency"))
    # per GPU: 4 heads * 512 B * 128k = 268.4 MB per layer, 21.5 GB for 80 layers; the room left after
    # weights, activations and reserve is ~10.7 GB, so the fewest layers that must go to host is:
    layer_bytes = 4 * 512 * 131072
    room = 80 * GiB - 141.2e9 / 2 - act(2, 1) - reserve
    k = math.ceil((80 * layer_bytes - room) / layer_bytes)
    assert len(sol.host_layers) == k == 40
    assert sol.host_kv_bytes == 2 * k * layer_bytes  # both ranks hold their 4 heads of each host layer
    # host layers are link-bound: 268.4 MB / 64 GB/s each; HBM layers read weights + KV
    w = 141.2e9 / 2 / 80 / 3.35e12
    host_t = max(w + 2 * layer_bytes / 3.35e12, layer_bytes / 64e9)
    hbm_t = w + layer_bytes / 3.35e12
    comm = 2 * 80 * (2 * 1 / 2 * 8192 * 2 / 450e9 + 3e-6)
    assert sol.step_time_s == pytest.approx(k * host_t + (80 - k) * hbm_t + comm, rel=1e-6)
    assert "HBM short" in sol.binding


def _brute_force_ratio(p: ParallelProblem) -> float:
    """max over batch and every placement of batch / step, straight from the module docstring (t = 1)."""
    L, H = p.num_layers, p.num_kv_heads
    row = 4 * p.hidden_size + 2 * p.intermediate_size
    room = p.memory_bytes * (1 - p.reserve_fraction) - p.param_bytes - p.prefill_chunk * row * p.act_bytes
    per_seq_act = row * p.act_bytes + p.vocab_size * 4
    labels = [sorted(set(p.groups[la])) for la in range(L)]
    units = [(la, g) for la in range(L) for g in labels[la]]
    best = 0.0
    for host in itertools.product((0, 1), repeat=len(units)):
        spill = {u for u, x in zip(units, host, strict=True) if x}
        for b in range(p.batch, p.max_batch + 1):
            cells = [(la, h, (la, p.groups[la][h]) in spill) for la in range(L) for h in range(H)]
            kv = sum(p.kv_bytes[la][h] for la, h, out in cells if not out)
            hostb = sum(p.kv_bytes[la][h] for la, h, out in cells if out)
            if b * (kv + per_seq_act) > room or b * hostb > p.host_memory_bytes:
                break
            step = 0.0
            for la in range(L):
                hb = sum(p.kv_bytes[la][h] for h in range(H) if (la, p.groups[la][h]) in spill)
                db = sum(p.kv_bytes[la][h] for h in range(H)) - hb
                hbm = (p.param_bytes / L + b * (db + 2 * hb)) / p.memory_bandwidth
                comp = b * (2 * p.num_params / L + 4 * p.num_q_heads * p.head_dim * p.context) / p.flops
                step += max(hbm, b * hb / p.host_link_bandwidth, comp)
            best = max(best, b / step)
    return best


@pytest.mark.parametrize("link", [2.5e8, 5e7, 2e9])
def test_max_throughput_matches_brute_force_on_a_toy_instance(link):
    # 3 layers x 2 KV heads in two formats; memory for ~5 sequences in HBM, a slow-ish host link, so
    # spilling a cheap group can buy batch and the optimum is not obvious
    p = ParallelProblem(
        kv_bytes=((4000, 1000), (4000, 1000), (6000, 500)),
        groups=(("a", "b"), ("a", "b"), ("a", "b")),
        num_q_heads=2, head_dim=8, hidden_size=16, intermediate_size=32, vocab_size=10, num_params=2000,
        param_bytes=40_000, context=100, gpus=1, memory_bytes=140_000, memory_bandwidth=1e9, flops=1e15,
        host_link_bandwidth=link, interconnect_bandwidth=1e9, interconnect_latency_s=0.0, act_bytes=1,
        max_batch=14, reserve_fraction=0.0, prefill_chunk=1, host_memory_bytes=60_000,
    )  # fmt: skip
    sol = solve_parallel(p)
    assert sol.tokens_per_s == pytest.approx(_brute_force_ratio(p), rel=1e-6)
    assert sol.status == "OPTIMAL"
    if link == 2.5e8:
        assert sol.host_kv_bytes > 0  # the toy is built so that spilling pays at this link speed
    assert solve_parallel(p).to_facts() == sol.to_facts()  # deterministic


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="objective"):
        llama70(8192, gpus=8, objective="fastest")
    with pytest.raises(ValueError, match="batch"):
        llama70(8192, gpus=8, batch=0)
    with pytest.raises(ValueError, match="kv_read_bytes"):
        llama70(8192, gpus=8, kv_read_bytes=((1,),))


def test_place_pass_on_the_70b_meta_config_matches_the_solver():
    from kvcompile.api import optimize
    from kvcompile.passes.place import problem_for
    from kvcompile.report import render_placement
    from kvcompile.targets import load_target

    plan = optimize("llama-3-70b", target="h100-sxm:8", context=131072, objective="max-throughput",
                    progress=False)  # fmt: skip
    pl = plan.placement
    # the pass's problem is the uniform bf16 instance above (full heads of 512 B/token), MLP from the config
    assert pl["assumptions"]["intermediate_size"] == 28672
    direct = solve_parallel(llama70(131072, gpus=8, param_bytes=plan.model.param_bytes,
                                    num_params=plan.model.num_params))  # fmt: skip
    assert (pl["tp"], pl["batch"]) == (direct.tp, direct.batch) == (8, 11)
    assert pl["tokens_per_s"] == pytest.approx(direct.tokens_per_s)
    # ... and problem_for turns the plan's specs into exact per-head bytes and groups
    from kvcompile import capture
    from kvcompile.models import load

    program = capture(load("llama-3-70b").model)
    rows = [lp.heads for lp in plan.layers]
    p = problem_for(program, load_target("h100-sxm:8"), context=131072, assignment=rows)
    assert p.kv_bytes[0] == (512 * 131072,) * 8 and len(set(p.groups[0])) == 1
    text = render_placement(plan)
    assert "TP=8 of 8 GPUs;" in text and "batch            11 sequences" in text and "HBM capacity" in text
    assert "layers 0-79: hbm" in text


def test_place_pass_is_inert_on_one_gpu_without_a_throughput_objective():
    from kvcompile.api import optimize

    plan = optimize("llama-3-8b", target="h100-sxm", context=8192, progress=False)
    assert plan.placement is None
    plan = optimize("llama-3-8b", target="h100-sxm", context=8192, objective="min-latency", progress=False)
    assert plan.placement["tp"] == 1 and plan.placement["batch"] == 1


def test_data_parallel_replicas_count_in_node_throughput():
    # Llama-3-8B-like, fits one H100: TP=t runs 8/t independent replicas. TP=1 x 8 gives exactly 8x the
    # single-GPU result; the chosen degree must beat it and every other candidate on node tokens/s.
    kw = dict(layers=32, kv_heads=8, num_q_heads=32, head_dim=128, hidden_size=4096, intermediate_size=14336,
              vocab_size=128256, num_params=8_030_000_000, param_bytes=16_060_000_000, context=8192,
              head_bytes=512 * 8192, **H100)  # fmt: skip
    one = solve_parallel(ParallelProblem.uniform(gpus=1, **kw))
    node = solve_parallel(ParallelProblem.uniform(gpus=8, **kw))
    by_tp = {c["tp"]: c for c in node.candidates}
    assert by_tp[1]["replicas"] == 8 and by_tp[1]["batch"] == one.batch
    assert by_tp[1]["node_tokens_per_s"] == pytest.approx(8 * one.tokens_per_s)
    assert node.node_tokens_per_s == pytest.approx(node.replicas * node.tokens_per_s)
    assert node.node_tokens_per_s == max(c["node_tokens_per_s"] for c in node.candidates)
    assert node.replicas == 8 // node.tp
    # sharding weights frees KV room: fewer weight copies in the node beat 8 full copies here
    assert node.tp > 1 and node.node_tokens_per_s > 8 * one.tokens_per_s
    tp_only = solve_parallel(ParallelProblem.uniform(gpus=8, data_parallel=False, **kw))
    assert tp_only.replicas == 1 and tp_only.node_tokens_per_s <= node.node_tokens_per_s
