"""Every bad model / target / setting input on the CLI gets one documented error: one line on stderr,
exit status 2, no traceback; unexpected exceptions keep theirs (they are bugs); ``--debug`` shows the
traceback of expected ones. Each row here is a row of docs/bad_inputs.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

from kvcompile.cli import main
from kvcompile.models import ModelLoadError, load, plan_model_spec

CONFIG = json.loads((Path(load.__globals__["_CONFIG_DIR"]) / "llama-3-8b.json").read_text())
TARGET = yaml.safe_load((Path(__file__).resolve().parent.parent / "targets" / "h100-sxm.yaml").read_text())


def _model_file(tmp: Path, name: str) -> str:
    """Materialise the bad model input ``name`` under ``tmp``; returns the CLI MODEL argument."""
    cfg = dict(CONFIG)
    writers = {
        "list.json": lambda p: p.write_text("[1, 2]"),
        "zero-kv-heads.json": lambda p: p.write_text(json.dumps({**cfg, "num_key_value_heads": 0})),
        "no-model-type.json": lambda p: p.write_text(json.dumps({k: v for k, v in cfg.items() if k != "model_type"})),
        "unknown-model-type.json": lambda p: p.write_text(json.dumps({**cfg, "model_type": "nonsense"})),
        "missing-heads.json": lambda p: p.write_text(
            json.dumps({k: v for k, v in cfg.items() if k != "num_attention_heads"})
        ),
        "inconsistent-heads.json": lambda p: p.write_text(json.dumps({**cfg, "num_attention_heads": 7})),
        "kv-not-dividing.json": lambda p: p.write_text(json.dumps({**cfg, "num_key_value_heads": 5})),
        "negative-layers.json": lambda p: p.write_text(json.dumps({**cfg, "num_hidden_layers": -2})),
        "huge-layers.json": lambda p: p.write_text(json.dumps({**cfg, "num_hidden_layers": 10**9})),
        "string-heads.json": lambda p: p.write_text(json.dumps({**cfg, "num_attention_heads": "32"})),
        "bad-dtype.json": lambda p: p.write_text(json.dumps({**cfg, "torch_dtype": "int7"})),
        "nan.json": lambda p: p.write_text('{"model_type": "llama", "hidden_size": NaN}'),
        "not-utf8.json": lambda p: p.write_bytes(b"\xff\xfe{}"),
        "truncated.json": lambda p: p.write_text(json.dumps(cfg)[:40]),
        "gguf-magic-zeros.gguf": lambda p: p.write_bytes(b"GGUF" + b"\0" * 64),
        "text.gguf": lambda p: p.write_text("hello"),
        "empty.gguf": lambda p: p.write_bytes(b""),
    }
    path = tmp / name
    if name in writers:
        writers[name](path)
    elif name == "empty-dir":
        path.mkdir()
    elif name == "dir-config-list":
        path.mkdir()
        (path / "config.json").write_text("[1]")
    elif name == "dir-without-weights":
        path.mkdir()
        (path / "config.json").write_text(json.dumps(cfg))
    elif name == "dir-pickle-weights":
        path.mkdir()
        (path / "config.json").write_text(json.dumps(cfg))
        (path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return str(path)  # "missing.json" etc.: never created


MODEL_ROWS = [
    ("list.json", "must be a JSON object, got list"),
    ("zero-kv-heads.json", "num_key_value_heads=0 must be an integer in"),
    ("no-model-type.json", "no 'model_type'"),
    ("unknown-model-type.json", "Unrecognized model identifier"),
    ("missing-heads.json", "config lacks 'num_attention_heads'"),
    ("inconsistent-heads.json", "not a multiple of the number of attention heads"),
    ("kv-not-dividing.json", "not a multiple of 5 KV heads"),
    ("negative-layers.json", "num_hidden_layers=-2"),
    ("huge-layers.json", "num_hidden_layers=1000000000"),
    ("string-heads.json", "num_attention_heads"),
    ("bad-dtype.json", "dtype 'int7'"),
    ("nan.json", "NaN is not allowed"),
    ("not-utf8.json", "not UTF-8"),
    ("truncated.json", "not valid JSON"),
    ("gguf-magic-zeros.gguf", "not a GGUF file"),
    ("text.gguf", "not a GGUF file"),
    ("empty.gguf", "not a GGUF file"),
    ("empty-dir", "cannot load"),
    ("dir-config-list", "must be a JSON object"),
    ("dir-without-weights", "no file named model.safetensors"),
    ("dir-pickle-weights", "no file named model.safetensors"),
    ("missing.json", "cannot load"),
    ("missing.gguf", "cannot load"),
    ("missing-dir/", "cannot load"),
]


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line(rc, err, message, command="compile"):
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"kvcompile {command}: error: ") and message in err, err


@pytest.mark.parametrize(("name", "message"), MODEL_ROWS, ids=[r[0] for r in MODEL_ROWS])
def test_bad_models(capsys, tmp_path, name, message):
    spec = _model_file(tmp_path, name)
    rc, _, err = _run(capsys, "compile", spec, "--no-progress", "-o", str(tmp_path / "x.kvplan"))
    _assert_one_line(rc, err, message)
    with pytest.raises(ModelLoadError, match=message.split("'")[0][:20]):
        load(spec)  # the API raises the same documented type


def _target_file(tmp: Path, name: str) -> str:
    t = dict(TARGET)
    texts = {
        "non-string-keys.yaml": "1: 2\n? [a]\n: 3\n",
        "list.yaml": "- 1\n- 2\n",
        "bad-yaml.yaml": "a: [\n",
        "alias-bomb.yaml": 'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
        'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n',
        "negative-memory.yaml": yaml.safe_dump({**t, "memory_bytes": -5}),
        "inf-bandwidth.yaml": yaml.safe_dump({**t, "memory_bandwidth": float("inf")}),  # written as .inf
        "nan-flops.yaml": yaml.safe_dump({**t, "flops": {**t["flops"], "fp32": float("nan")}}),
        "negative-flops.yaml": yaml.safe_dump({**t, "flops": {**t["flops"], "bf16": -1.0}}),
        "missing-field.yaml": yaml.safe_dump({k: v for k, v in t.items() if k != "memory_bytes"}),
        "string-number.yaml": yaml.safe_dump({**t, "memory_bytes": "lots"}),
        "unknown-field.yaml": yaml.safe_dump({**t, "turbo": True}),
    }  # fmt: skip
    path = tmp / name
    if name in texts:
        path.write_text(texts[name])
    return str(path)


TARGET_ROWS = [
    ("non-string-keys.yaml", "invalid YAML"),
    ("list.yaml", "expected a mapping"),
    ("bad-yaml.yaml", "invalid YAML"),
    ("alias-bomb.yaml", "more than 10000 values"),
    ("negative-memory.yaml", "memory_bytes: Input should be greater than 0"),
    ("inf-bandwidth.yaml", "non-finite number inf"),
    ("nan-flops.yaml", "non-finite number nan"),
    ("negative-flops.yaml", "must be in [0, 1e19]"),
    ("missing-field.yaml", "memory_bytes: Field required"),
    ("string-number.yaml", "memory_bytes: Input should be a valid integer"),
    ("unknown-field.yaml", "turbo: Extra inputs are not permitted"),
    ("missing.yaml", "cannot read"),
]


@pytest.mark.parametrize(("name", "message"), TARGET_ROWS, ids=[r[0] for r in TARGET_ROWS])
def test_bad_target_files(capsys, tmp_path, name, message):
    target = _target_file(tmp_path, name)
    rc, _, err = _run(capsys, "compile", "gpt2", "--target", target, "--no-progress", "-o", str(tmp_path / "x"))
    _assert_one_line(rc, err, message)


SPEC_ROWS = [
    (["--target", "../targets/h100-sxm"], "a name is letters, digits"),
    (["--target", "h100/../../x"], "a name is letters, digits"),
    (["--target", ""], "expected NAME, NAME:N or a .yaml file"),
    (["--target", "tpu-v9"], "unknown target 'tpu-v9'"),
    (["--target", "h100:0"], "gpus: Input should be greater than or equal to 1"),
    (["--target", "h100:-1"], "GPU count after ':' must be an integer >= 1"),
    (["--target", "h100:abc"], "GPU count after ':' must be an integer >= 1"),
    (["--target", "h100:100000"], "gpus: Input should be less than or equal to 64"),
    (["--gpus", "0"], "gpus=0 must be >= 1"),
    (["--gpus", "-3"], "gpus=-3 must be >= 1"),
    (["--gpus", "99999"], "less than or equal to 64"),
    (["--context", str(10**12)], "context=1000000000000: Input should be less than or equal to 16777216"),
    (["--context", "0"], "context=0"),
    (["--context", "-5"], "context=-5"),
    (["--batch", "0"], "batch=0"),
    (["--batch", "-4"], "batch=-4"),
    (["--batch", str(10**9)], "batch=1000000000"),
    (["--tolerance", "nan"], "tolerance=nan: Input should be a finite number"),
    (["--tolerance", "-1"], "tolerance=-1.0"),
    (["--objective", "nonsense"], "'nonsense' is not one of"),
    (["--kv-budget", "0"], "kv_budget=0.0"),
    (["--kv-budget", "1.5"], "kv_budget=1.5"),
    (["--kv-budget", "nan"], "kv_budget=nan"),
    (["--kv-budget", "inf"], "kv_budget=inf"),
    (["--kv-budget-bytes", "-1"], "kv_budget_bytes=-1"),
    (["--latency-budget", "-1"], "latency_budget_s=-1.0"),
    (["--latency-budget", "inf"], "latency_budget_s=inf"),
]


@pytest.mark.parametrize(("args", "message"), SPEC_ROWS, ids=[" ".join(r[0]) for r in SPEC_ROWS])
def test_bad_targets_and_settings(capsys, tmp_path, args, message):
    rc, _, err = _run(capsys, "compile", "gpt2", *args, "--no-progress", "-o", str(tmp_path / "x.kvplan"))
    _assert_one_line(rc, err, message)


@pytest.fixture(scope="module")
def plan70b_path(tmp_path_factory):
    import kvcompile

    path = tmp_path_factory.mktemp("p") / "70b.kvplan"
    return kvcompile.optimize("llama-3-70b", target="h100-sxm:8", progress=False).save(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--context", str(10**12)], "context=1000000000000 and batch=1 must be in"),
        (["--batch", "0"], "batch=0 must be in"),
        (["--context", "-1"], "context=-1"),
        (["--heatmap", "/nonexistent/dir/x.png"], "No such file or directory"),
    ],
)
def test_bad_inspect_settings(capsys, plan70b_path, args, message):
    rc, _, err = _run(capsys, "inspect", str(plan70b_path), *args)
    _assert_one_line(rc, err, message, "inspect")


def test_inspect_non_files(capsys, tmp_path):
    rc, _, err = _run(capsys, "inspect", str(tmp_path))
    _assert_one_line(rc, err, "cannot read (Is a directory)", "inspect")
    (tmp_path / "x.kvplan").write_bytes(b"\xff\xfe")
    rc, _, err = _run(capsys, "inspect", str(tmp_path / "x.kvplan"))
    _assert_one_line(rc, err, "not UTF-8", "inspect")


def test_unexpected_exceptions_are_bugs_and_keep_their_traceback(monkeypatch, capsys):
    import kvcompile.cli as cli

    def boom(args):
        raise KeyError("a bug")

    monkeypatch.setitem(cli._COMMANDS, "targets", boom)
    with pytest.raises(KeyError, match="a bug"):
        main(["targets"])
    with pytest.raises(ValueError, match="plain"):  # a bare ValueError is not a documented error either
        monkeypatch.setitem(cli._COMMANDS, "targets", lambda a: (_ for _ in ()).throw(ValueError("plain")))
        main(["targets"])


def test_debug_shows_the_traceback_of_expected_errors(capsys):
    rc, _, err = _run(capsys, "inspect", "/nonexistent/x.kvplan", "--debug")
    assert rc == 2 and "Traceback" in err and err.strip().endswith("(No such file or directory)")


def test_pass_errors_are_expected_only_for_value_errors():
    from kvcompile.cli import is_expected
    from kvcompile.passes import PassError

    def wrapped(cause):
        try:
            raise PassError("pass 'x' failed") from cause
        except PassError as e:
            return e

    assert is_expected(wrapped(ValueError("budget infeasible")))
    assert not is_expected(wrapped(KeyError("slip")))


def test_eval_never_loads_the_path_a_plan_names(capsys, tmp_path):
    from kvcompile.runtime.builders import uniform_plan

    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=32)  # fmt: skip
    torch.manual_seed(0)
    evil = tmp_path / "evil-model"  # a local HF dir the plan points at
    plan = uniform_plan(T.LlamaForCausalLM(cfg), "full", context=256, name=str(evil))
    path = plan.save(tmp_path / "p.kvplan")
    rc, _, err = _run(capsys, "eval", str(path), "--no-progress")
    _assert_one_line(rc, err, "is not a built-in model name", "eval")
    assert plan_model_spec("llama-3-8b") == "llama-3-8b" and plan_model_spec("smollm2-135m") == "smollm2-135m"
    with pytest.raises(ModelLoadError, match="--model"):
        plan_model_spec("../../some/dir")
