"""Token selection (StreamingLLM, H2O, SnapKV) against independent per-head re-implementations
of each paper's rule, written with python sets and ``reference_attention``."""

from __future__ import annotations

import pytest
import torch

from kvcompile.strategies import REGISTRY, reference_attention

B, G, SCALE, D = 2, 3, 0.125, 64
PAD = 6  # row 1 is left-padded


def inputs(n, hg, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, hg, n, d, generator=g), torch.randn(B, hg, n, d, generator=g)
    q = torch.randn(B, hg * G, n, d, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :PAD] = False
    return q, k, v, valid


def run(s, q, k, v, valid, pre, d=D):
    """Prefill ``pre`` tokens then decode one by one; yields (t_end, store, output) after each step."""
    hg = k.shape[1]
    st = s.new_store(
        batch=B, num_heads=hg, head_dim=d, gqa=G, dtype=torch.float32, device=torch.device("cpu")
    )
    spans = [(0, pre)] + [(t, t + 1) for t in range(pre, k.shape[2])]
    for a, b in spans:
        sl = slice(a, b)
        out = st.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], valid[:, sl], SCALE)
        st.append(k[:, :, sl], v[:, :, sl], q[:, :, sl], valid[:, sl])
        yield b, st, out


def kept_sets(st):
    pos = st.tensors()["pos"]
    assert (pos.sort(dim=-1).values == pos).all(), "pos must be sorted ascending"
    return [[set(p for p in pos[b, h].tolist() if p >= 0) for h in range(pos.shape[1])] for b in range(B)]


def check_contents(st, k, v, t_end):
    """Stored K/V rows are exact copies of the originals at their positions."""
    t = st.tensors()
    pos = t["pos"].long()
    for b in range(B):
        for h in range(pos.shape[1]):
            m = pos[b, h] >= 0
            torch.testing.assert_close(t["k"][b, h][m], k[b, h, pos[b, h][m]])
            torch.testing.assert_close(t["v"][b, h][m], v[b, h, pos[b, h][m]])


@pytest.mark.parametrize("sinks,window", [(4, 20), (0, 16), (8, 8)])
def test_sink_window_keeps_sinks_and_recent(sinks, window):
    s = REGISTRY["sink_window"](sinks=sinks, window=window)
    q, k, v, valid = inputs(97, 2, seed=sinks + window)
    for t_end, st, _ in run(s, q, k, v, valid, pre=60):
        sets = kept_sets(st)
        for b in range(B):
            lead = PAD if b == 1 else 0
            want = set(range(lead, lead + sinks)) | set(range(max(lead, t_end - window), t_end))
            assert all(x == want for x in sets[b]), (t_end, b, sorted(sets[b][0] ^ want))
        assert st.tensors()["k"].shape[2] == min(t_end, sinks + window)
    check_contents(st, k, v, t_end)


@pytest.mark.parametrize(
    "s",
    [
        REGISTRY["sink_window"](sinks=4, window=12),
        REGISTRY["heavy_hitter"](budget=16, recent=4),
        REGISTRY["snapkv"](budget=12, obs_window=4, decode_window=5),
    ],
    ids=lambda s: s.name,
)
def test_decode_attention_is_over_kept_tokens(s):
    """At each decode step the output equals reference attention over the tokens kept after the
    previous step plus the new one (the evicted tokens really are gone)."""
    q, k, v, valid = inputs(44, 3, seed=2)
    prev = None
    for t_end, st, out in run(s, q, k, v, valid, pre=30):
        if prev is not None:
            mask = torch.zeros(B, 3, t_end, dtype=torch.bool)
            for b in range(B):
                for h in range(3):
                    mask[b, h, sorted(prev[b][h])] = True
            mask[:, :, t_end - 1] = True
            sl = slice(t_end - 1, t_end)
            ref, _ = reference_attention(q[:, :, sl], k[:, :, :t_end], v[:, :, :t_end], mask, SCALE)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        prev = kept_sets(st)
        assert sum(len(x) for row in prev for x in row) < B * 3 * t_end  # it does evict


def h2o_reference(q, k, v, valid, pre, budget, recent):
    """H2O per (row, head) with dictionaries: accumulate softmax mass, evict to the budget keeping
    the ``recent`` newest and the largest accumulated scores. Returns kept sets after each step."""
    Bn, hg, n, _ = k.shape
    _, probs = reference_attention(
        q[:, :, :pre], k[:, :, :pre], v[:, :, :pre], valid[:, None, :pre], SCALE, pre, return_probs=True
    )
    mass = probs.view(Bn, hg, G, pre, pre).sum(dim=(2, 3))
    scores = [
        [{p: mass[b, h, p].item() for p in range(pre) if valid[b, p]} for h in range(hg)] for b in range(Bn)
    ]

    def evict(sc, seen):
        if len(sc) <= budget:
            return
        rec = {p for p in sc if p >= seen - recent}
        rest = sorted((p for p in sc if p not in rec), key=lambda p: -sc[p])[: budget - len(rec)]
        for p in [p for p in sc if p not in rec and p not in rest]:
            del sc[p]

    history = {}
    for b in range(Bn):
        for h in range(hg):
            evict(scores[b][h], pre)
    history[pre] = [[set(s) for s in row] for row in scores]
    for t in range(pre, n):
        for b in range(Bn):
            for h in range(hg):
                sc = scores[b][h]
                keys = sorted(sc) + [t]
                s = q[b, h * G : (h + 1) * G, t] @ k[b, h, keys].T * SCALE  # [G, len]
                p = torch.softmax(s, dim=-1).sum(0)
                for i, key in enumerate(keys):
                    sc[key] = sc.get(key, 0.0) + p[i].item()
                evict(sc, t + 1)
        history[t + 1] = [[set(s) for s in row] for row in scores]
    return history, scores


@pytest.mark.parametrize("budget,recent", [(24, 8), (16, 0), (30, 30)])
def test_heavy_hitter_keeps_top_accumulated_scores(budget, recent):
    s = REGISTRY["heavy_hitter"](budget=budget, recent=recent)
    q, k, v, valid = inputs(97, 2, seed=budget)
    pre = 70
    history, final = h2o_reference(q, k, v, valid, pre, budget, recent)
    for t_end, st, _ in run(s, q, k, v, valid, pre):
        assert kept_sets(st) == history[t_end], t_end
    check_contents(st, k, v, 97)
    pos, score = st.tensors()["pos"], st.tensors()["score"]
    for b in range(B):
        for h in range(2):
            want = torch.tensor([final[b][h][p] for p in pos[b, h].tolist()])
            torch.testing.assert_close(score[b, h], want, atol=1e-4, rtol=1e-4)


def snapkv_reference(q, k, v, valid, pre, budget, w, kernel):
    """SnapKV prefill selection: obs-window attention summed over queries and G heads, max-pooled
    over the prefix (explicit windows), top-``budget`` prefix tokens plus the window."""
    Bn, hg = k.shape[:2]
    _, probs = reference_attention(
        q[:, :, pre - w : pre],
        k[:, :, :pre],
        v[:, :, :pre],
        valid[:, None, :pre],
        SCALE,
        w,
        return_probs=True,
    )
    mass = probs.view(Bn, hg, G, w, pre).sum(dim=(2, 3))
    prefix, r = pre - w, kernel // 2
    out = []
    for b in range(Bn):
        row = []
        for h in range(hg):
            m = mass[b, h, :prefix].tolist()
            pooled = [max(m[max(0, i - r) : i + r + 1]) for i in range(prefix)]
            cand = [i for i in range(prefix) if valid[b, i]]
            top = sorted(cand, key=lambda i: (-pooled[i], -m[i]))[:budget]  # plateau ties: own mass
            row.append(set(top) | {i for i in range(prefix, pre) if valid[b, i]})
        out.append(row)
    return out


@pytest.mark.parametrize("budget,w,kernel,dw", [(20, 8, 5, None), (16, 4, 7, 6), (10, 8, 1, None)])
def test_snapkv_selection_equals_pool_topk(budget, w, kernel, dw):
    s = REGISTRY["snapkv"](budget=budget, obs_window=w, pool_kernel=kernel, decode_window=dw)
    q, k, v, valid = inputs(97, 3, seed=budget + w)
    pre = 80
    ref = snapkv_reference(q, k, v, valid, pre, budget, w, kernel)
    for t_end, st, _ in run(s, q, k, v, valid, pre):
        decoded = set(range(pre, t_end)) if dw is None else set(range(max(pre, t_end - dw), t_end))
        assert kept_sets(st) == [[x | decoded for x in row] for row in ref], t_end
    check_contents(st, k, v, 97)


def test_selection_never_keeps_padding_in_short_rows():
    """A row with fewer real tokens than the budget keeps all of them and marks empty slots -1."""
    for s in (
        REGISTRY["sink_window"](sinks=2, window=20),
        REGISTRY["heavy_hitter"](budget=20, recent=4),
        REGISTRY["snapkv"](budget=16, obs_window=4),
    ):
        n = 30
        q, k, v, valid = inputs(n, 1, seed=7)
        valid[1, :20] = False  # 10 real tokens in row 1
        *_, (t_end, st, out) = run(s, q, k, v, valid, pre=n)
        pos = st.tensors()["pos"]
        assert pos.shape[-1] == s.cap() < n
        assert set(pos[1, 0].tolist()) == {-1} | set(range(20, 30)), s.name
        assert (pos[1, 0] == -1).sum() == s.cap() - 10
        assert torch.isfinite(out).all()
