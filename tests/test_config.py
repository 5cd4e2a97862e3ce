"""Every config mistake exits 2 with one message naming the file, the key and the value."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from kd_ops.cli import main
from kd_ops.config import ConfigError, load_config

from .conftest import ROOT, tiny_raw


def _write(tmp_path, raw) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _distill_error(capsys, argv) -> str:
    assert main(["distill", *argv]) == 2
    out = capsys.readouterr()
    assert out.out == "", "errors go to stderr only"
    assert "Traceback" not in out.err
    return out.err


@pytest.mark.parametrize(
    "section,change,key,value_text",
    [
        ("distill", {"temperature": -1.0}, "distill.temperature", "-1.0"),
        ("distill", {"temperature": 0}, "distill.temperature", "0"),
        ("distill", {"kd_weight": 0, "ce_weight": 0}, "distill", "kd_weight and ce_weight are both 0"),
        ("distill", {"kd_weight": -0.5}, "distill.kd_weight", "-0.5"),
        ("data", {"train_fraction": 0}, "data.train_fraction", "0"),
        ("data", {"train_fraction": 1.5}, "data.train_fraction", "1.5"),
        ("data", {"exclude_classes": [12]}, "data.exclude_classes", "[12]"),
        ("data", {"exclude_classes": list(range(10))}, "data.exclude_classes", "leaves no class"),
        ("data", {"name": "cifar"}, "data.name", "'cifar'"),
        ("student", {"epochs": "many"}, "student.epochs", "'many'"),
        ("student", {"model": "resnet"}, "student.model", "'resnet'"),
        ("student", {"params": {"hiden": [3]}}, "student.params.hiden", "[3]"),
        ("teacher", {"params": {"channels": "wide"}}, "teacher.params.channels", "'wide'"),
        ("distill", {"method": "magic"}, "distill.method", "'magic'"),
        ("distill", {"temprature": 2}, "distill.temprature", "2"),
    ],
)
def test_bad_value_names_file_key_and_value(tmp_path, capsys, tracking_uri, section, change, key, value_text):
    raw = tiny_raw(tracking_uri)
    raw[section] = {**raw[section], **change}
    path = _write(tmp_path, raw)
    err = _distill_error(capsys, [path])
    assert path in err and key in err and value_text in err, err
    assert len(err.strip().splitlines()) <= 3


def test_unknown_top_level_key(tmp_path, capsys, tracking_uri):
    path = _write(tmp_path, {**tiny_raw(tracking_uri), "sead": 1})
    err = _distill_error(capsys, [path])
    assert "sead" in err and "unknown key" in err


def test_set_override_is_validated_and_attributed(tmp_path, capsys, tracking_uri):
    path = _write(tmp_path, tiny_raw(tracking_uri))
    err = _distill_error(capsys, [path, "--set", "distill.temperature=-2"])
    assert "distill.temperature = -2 (from --set)" in err
    err = _distill_error(capsys, [path, "--set", "distill.nope=1"])
    assert "distill.nope" in err and "unknown key" in err
    err = _distill_error(capsys, [path, "--set", "novalue"])
    assert "KEY=VALUE" in err


def test_set_override_applies(tmp_path, tracking_uri):
    path = _write(tmp_path, tiny_raw(tracking_uri))
    cfg = load_config(path, ["distill.temperature=2.5", "data.exclude_classes=[1, 2]", "teacher.uri=models:/x/1"])
    assert cfg.distill.temperature == 2.5
    assert cfg.data.exclude_classes == [1, 2]
    assert cfg.teacher.uri == "models:/x/1"


def test_missing_file_and_bad_yaml(tmp_path, capsys):
    err = _distill_error(capsys, [str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    err = _distill_error(capsys, [str(bad)])
    assert "bad.yaml" in err and "YAML" in err
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    err = _distill_error(capsys, [str(listy)])
    assert "mapping" in err


def test_yaml_is_loaded_safely(tmp_path):
    """A config cannot run code: python tags are refused by the safe loader."""
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("example", ["digits.yaml", "mnist5k.yaml"])
def test_examples_are_valid(example):
    cfg = load_config(ROOT / "examples" / example)
    assert cfg.distill.method == "kd"


def test_console_script_exits_2_without_traceback(tmp_path, tracking_uri):
    raw = tiny_raw(tracking_uri)
    raw["distill"]["temperature"] = -3
    path = _write(tmp_path, raw)
    proc = subprocess.run(
        [sys.executable, "-m", "kd_ops.cli", "distill", path], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert f"invalid config {path}" in proc.stderr and "distill.temperature = -3" in proc.stderr
