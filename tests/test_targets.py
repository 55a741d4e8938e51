"""Target files: every shipped file validates; bad files give one-line TargetErrors; node specs."""

from __future__ import annotations

import pytest
import yaml

from kvcompile.targets import TARGET_DIR, TargetError, available, load_target, load_target_file

REQUIRED = {
    "h100-sxm", "h100-pcie", "h200", "a100-80gb", "a100-40gb", "l40s", "l4", "rtx-4090", "mi300x", "cpu",
}


def test_required_targets_ship():
    assert set(available()) >= REQUIRED


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_target_file_validates(name):
    t = load_target(name)
    assert t.name == name and t.gpus == 1
    assert len(t.source) >= 8
    assert t.memory_bytes > 2**30 and t.memory_bandwidth > 1e10
    assert t.flops["bf16"] >= t.flops["fp32"] > 0
    assert "bfloat16" in t.kv_dtypes or "float32" in t.kv_dtypes
    raw = yaml.safe_load((TARGET_DIR / f"{name}.yaml").read_text())
    assert set(raw) == set(type(t).model_fields) - {"gpus"}  # every field spelled out in the file


def test_datasheet_facts():
    assert load_target("h100-sxm").memory_bandwidth == 3.35e12
    assert load_target("h200").memory_bandwidth == 4.8e12
    assert load_target("a100-40gb").memory_bytes == 40 * 2**30
    assert not load_target("a100-80gb").supports_fp8  # Ampere has no fp8
    assert load_target("h100-pcie").supports_fp8
    assert load_target("mi300x").memory_bytes == 192 * 2**30


def test_node_specs():
    assert load_target("h100-sxm:8").gpus == 8
    assert load_target("h100-sxm:8").spec == "h100-sxm:8"
    assert load_target("h100-sxm", gpus=4).gpus == 4
    assert load_target("h100").name == "h100-sxm"  # alias
    with pytest.raises(TargetError, match="GPU count after ':' must be an integer"):
        load_target("h100-sxm:x")
    with pytest.raises(TargetError, match="unknown target 'tpu'"):
        load_target("tpu")


def _write(tmp_path, **changes):
    raw = yaml.safe_load((TARGET_DIR / "h100-sxm.yaml").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"memory_bytes": -1}, "memory_bytes"),
        ({"source": None}, "source"),
        ({"kv_dtypes": ["float9"]}, "unknown kv_dtypes"),
        ({"flops": {"fp32": 1.0}}, "flops is missing"),
        ({"color": "green"}, "color"),
        ({"kind": "tpu"}, "kind"),
    ],
)
def test_bad_target_files(tmp_path, changes, message):
    with pytest.raises(TargetError, match=message) as e:
        load_target_file(_write(tmp_path, **changes))
    assert "\n" not in str(e.value)


def test_bad_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: [unclosed")
    with pytest.raises(TargetError, match="invalid YAML"):
        load_target_file(p)
    p.write_text("- a list")
    with pytest.raises(TargetError, match="expected a mapping"):
        load_target_file(p)
