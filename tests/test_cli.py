"""The kvcompile CLI, run in-process: compile / inspect / targets, one-line errors, eval/bench delegation."""

from __future__ import annotations

import sys
import types

import pytest

from kvcompile import cli
from kvcompile.plan import load


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def plan70b(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "70b.kvplan"
    rc = cli.main(["compile", "llama-3-70b", "--target", "h100-sxm:8", "--context", "8192", "--no-progress",
                   "-o", str(path)])
    assert rc == 0
    return path


def test_compile_70b_reports_full_kv_bytes(plan70b, capsys):
    plan = load(plan70b)
    assert plan.target.gpus == 8 and plan.model.on_meta and plan.model.dtype == "bfloat16"
    assert plan.predicted["full_bf16_kv_bytes_per_token"] == 2 * 80 * 8 * 128 * 2 == 327680
    assert plan.full_kv_bytes(8192) == 327680 * 8192
    assert len(plan.layers) == 80 and all(len(lp.heads) == 8 for lp in plan.layers)


def test_compile_prints_summary(tmp_path, capsys):
    argv = ["compile", "llama-3-8b", "--target", "a100-80gb", "--gpus", "2", "--batch", "4"]
    rc, out, err = _run(capsys, *argv, "-o", str(tmp_path / "8b.kvplan"))
    assert rc == 0, err
    assert "131072 B/token (bfloat16)" in out
    assert "a100-80gb x2, context 4096, batch 4" in out
    assert "wrote" in out and (tmp_path / "8b.kvplan").is_file()
    assert "captured 32 attention sites" in err  # progress lines go to stderr


def test_inspect_70b(plan70b, capsys):
    rc, out, err = _run(capsys, "inspect", str(plan70b), "--batch", "16")
    assert rc == 0, err
    plan = load(plan70b)
    labels = {spec["name"] for lp in plan.layers for spec in lp.heads}
    assert any(name in out for name in labels)
    assert "h0" in out and "327680 B (bfloat16)" in out
    assert "8 x 80.00 GiB" in out and "batch 16" in out
    assert "fits" in out


def test_inspect_heatmap(plan70b, tmp_path, capsys):
    png = tmp_path / "heat.png"
    rc, out, err = _run(capsys, "inspect", str(plan70b), "--heatmap", str(png))
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets(capsys):
    rc, out, _ = _run(capsys, "targets")
    assert rc == 0
    from test_targets import REQUIRED

    for name in REQUIRED:
        assert f"\n{name} " in out
    assert "3.35 TB/s" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compile", "llama-3-8b", "--target", "tpu-v9"], "unknown target 'tpu-v9'"),
        (["compile", "llama-3-8b", "--context", "0"], "context=0"),
        (["compile", "llama-3-8b", "--kv-budget", "1.5"], "kv_budget=1.5"),
        (["compile", "no-such-model"], "cannot load 'no-such-model'"),
        (["inspect", "/nonexistent/x.kvplan"], "cannot read"),
    ],
)
def test_errors_are_one_line_exit_2(capsys, tmp_path, argv, message):
    argv = [*argv, "-o", str(tmp_path / "x.kvplan")] if argv[0] == "compile" else argv
    rc, out, err = _run(capsys, *argv, *(["--no-progress"] if argv[0] == "compile" else []))
    assert rc == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert err.startswith(f"kvcompile {argv[0]}: error: ")


def test_inspect_tampered_plan(plan70b, tmp_path, capsys):
    bad = tmp_path / "bad.kvplan"
    bad.write_text(plan70b.read_text().replace('"context": 8192', '"context": 8193'))
    rc, _, err = _run(capsys, "inspect", str(bad))
    assert rc == 2 and "content hash mismatch" in err and err.count("\n") == 1


def test_delegation(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("fake_eval_cli")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "fake_eval_cli", fake)
    monkeypatch.setitem(cli._DELEGATES, "eval", "fake_eval_cli")
    assert cli.main(["eval", "plan.kvplan", "--task", "passkey"]) == 0
    assert seen["argv"] == ["plan.kvplan", "--task", "passkey"]

    monkeypatch.setitem(cli._DELEGATES, "bench", "kvcompile._no_such_module")
    rc, _, err = _run(capsys, "bench", "--quick")
    assert rc == 2 and "not available" in err


@pytest.mark.slow
def test_compile_and_inspect_smollm2(tmp_path, capsys):
    path = tmp_path / "smol.kvplan"
    argv = ["compile", "smollm2-135m", "--target", "h100", "--no-progress"]
    rc, out, err = _run(capsys, *argv, "-o", str(path))
    assert rc == 0, err
    # 30 layers * 3 KV heads * 64 * 2 (K, V) * 4 bytes (fp32)
    assert "46080 B/token (float32)" in out and "23040 B/token (bfloat16)" in out
    rc, out, err = _run(capsys, "inspect", str(path))
    assert rc == 0, err
    assert "smollm2-135m (LlamaForCausalLM, float32" in out and "real weights" in out


def test_inspect_mixed_layer_rows(plan70b):
    """Heads of one layer with different strategies get one sub-row per strategy, with exact bytes."""
    from kvcompile.report import fmt_bytes, render_inspect
    from kvcompile.strategies import from_spec

    plan = load(plan70b)
    fp8, q4 = {"name": "fp8"}, {"name": "quant", "bits": 4}
    mixed = plan.layers[1].model_copy(update={"heads": [fp8, fp8, q4, q4, q4, q4, fp8, q4]})
    plan = plan.model_copy(update={"layers": [plan.layers[0], mixed, *plan.layers[2:]]}).sealed()
    text = render_inspect(plan, context=1000)
    row = [ln for ln in text.splitlines() if ln.lstrip().startswith("1 ")]
    assert len(row) == 1, text
    q4_bytes = from_spec(q4).bytes_for(1000, 128, 2)
    fp8_bytes = from_spec(fp8).bytes_for(1000, 128, 2)
    assert "h0-h1,h6" in row[0] and f"{fmt_bytes(fp8_bytes)} each" in row[0]
    assert f"{fmt_bytes(3 * fp8_bytes + 5 * q4_bytes)}" in row[0]
    q_row = text.splitlines()[text.splitlines().index(row[0]) + 1]
    assert "h2-h5,h7" in q_row and from_spec(q4).short_label() in q_row and f"{fmt_bytes(q4_bytes)} each" in q_row
    assert f"  {from_spec(q4).short_label()}  {from_spec(q4).label()}" in text  # the legend gives the full label
    assert " 2-79 " in text  # the identical full layers after it are merged


def test_inspect_table_narrow_with_compositions():
    """A calibrated-style plan (compositions, quant, selection per head) renders a layer table of at most
    120 columns; every distinct strategy appears once in the legend under its short label."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcompile.report import View, layer_table
    from kvcompile.runtime import plan_for
    from kvcompile.strategies import Compose, HeavyHitter, MiKV, Quant, SinkWindow, SnapKV, ThinK, from_spec

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).eval()
    menu = [
        Compose(select=SnapKV(budget=2016, obs_window=32), quant=Quant(bits=4)),
        Compose(select=SinkWindow(sinks=4, window=2044), quant=Quant(bits=4)),
        Quant(bits=4),
        Compose(select=SnapKV(budget=992, obs_window=32), quant=Quant(bits=8)),
        MiKV(select=HeavyHitter(budget=992, recent=496), low_bits=2),
        ThinK(keep_ratio=0.5),
        {"name": "fp8"},
    ]
    plan = plan_for(model, lambda layer, h: menu[(layer * 3 + h) % len(menu)], 4096, name="tiny-llama")
    text = layer_table(plan, View.of(plan))
    table, legend = text.split("\nstrategies:\n")
    assert max(len(ln) for ln in table.splitlines()) <= 120, table
    assert max(len(from_spec(s).label() if isinstance(s, dict) else s.label()) for s in menu) > 120  # long labels
    entries = [ln.split(None, 1) for ln in legend.splitlines()]
    assert len(entries) == len(menu)
    for strat in menu:
        st = from_spec(strat) if isinstance(strat, dict) else strat
        assert [st.short_label(), st.label()] in entries
    assert "snapkv:2016+q4" in table and "sink4+win2044+q4" in table and "mikv(h2o:992,lo2)" in table
