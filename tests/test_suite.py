"""The shared task library (kvcompile.eval.suite): disjoint splits, exact framing, metrics, eval CLI."""

from __future__ import annotations

import json

import pytest

from kvcompile.eval import suite


def test_splits_are_disjoint():
    for a in suite.SPLITS:
        for b in suite.SPLITS:
            if a == b:
                continue
            assert not set(suite.paragraphs(a)) & set(suite.paragraphs(b))
            assert not set(suite.NAMES[a]) & set(suite.NAMES[b])
            for table in (suite.SINGLE, suite.MULTI, suite.TWOHOP):
                assert not {t[0] for t in table[a]} & {t[0] for t in table[b]}
            assert suite.INTRO[a] != suite.INTRO[b]


def test_metrics():
    assert suite.is_correct(" KT-482.", "KT-482") and suite.is_correct("the code is kt 482", "KT-482")
    assert not suite.is_correct(" 12345 or 54321", "12345", distractors=["54321"])
    rows = [{"family": "single", "correct": True}, {"family": "single", "correct": False},
            {"family": "lm", "nll": 2.0, "tokens": 2}]
    out = suite.summarize(rows)
    assert out["single"] == {"n": 2, "accuracy": 0.5} and abs(out["lm"]["ppl"] - 2.718281828) < 1e-6
    assert out["pooled"] == {"accuracy": 0.5, "families": 1}


@pytest.mark.slow
def test_samples_are_framed_exactly(smol):
    tok = smol.tokenizer
    for fam in suite.FAMILIES:
        a = suite.make_sample(tok, fam, "verify", 512, 3)
        b = suite.make_sample(tok, fam, "verify", 512, 3)
        assert a.ids.tolist() == b.ids.tolist() and 0 < a.context_len < a.length <= 512
        ctx = tok.decode(a.ids[0, : a.context_len])
        if fam == "lm":
            assert a.length == 512 and a.context_len == 512 - suite.LM_TARGET
            continue
        assert a.answer in ctx and a.answer not in tok.decode(a.ids[0, a.context_len:])
        assert tok.decode(a.meta["answer_ids"]).strip() == a.answer + "."
        if fam == "followup":
            assert a.meta["answer2"] in ctx
    assert suite.make_sample(tok, "single", "test", 512, 3).ids.tolist() != \
        suite.make_sample(tok, "single", "verify", 512, 3).ids.tolist()


@pytest.mark.slow
def test_eval_cli_runs_task_library_families(smol, tmp_path, capsys):
    from kvcompile.eval.cli import main

    out = tmp_path / "r.json"
    assert main(["--dynamic", "--tasks", "single,lm", "--lengths", "384", "--samples", "1", "--split", "verify",
                 "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    tasks = {r["task"]: r for r in res["results"]}
    assert set(tasks) == {"single", "lm"} and tasks["single"]["n"] == 1 and tasks["lm"]["ppl"] > 1
    assert res["config"]["split"] == "verify"
