"""Every config mistake exits 2 with one message naming the file, the key and the value."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from kd_ops.cli.main import main
from kd_ops.config.loading import load_config
from kd_ops.core.errors import ConfigError

from ..conftest import ROOT, tiny_raw


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


# -- hostile and careless files: one line, exit 2, at once -------------------------------------
_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['x'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)


def test_an_alias_bomb_is_refused_before_anything_expands(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(_BOMB)  # 9^9 = 387 million strings once expanded, from about 320 bytes
    assert len(_BOMB) < 400
    err = _distill_error(capsys, [str(path)])
    assert str(path) in err and "YAML aliases" in err and len(err.strip().splitlines()) == 1
    # The same bomb as the value of an otherwise valid key, and behind --set.
    path.write_text(_BOMB.replace("i: &i", "seed: &i"))
    assert "YAML aliases" in _distill_error(capsys, [str(path)])
    good = _write(tmp_path, tiny_raw("sqlite:///unused.db"))
    small = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x]", *["*a"] * 8]) + "]"  # 81 values: fine
    with pytest.raises(ConfigError, match=r"seed = .*\(from --set\): Input should be a valid integer"):
        load_config(good, [f"seed={small}"])
    with pytest.raises(ConfigError, match="--set distill.params: expands to more than"):
        load_config(good, [f"distill.params={{x: {_nested_bomb()}}}"])


def _nested_bomb() -> str:
    """A flow-style bomb for one --set value: each level repeats the previous anchor nine times."""
    text = "&l0 [x, x, x, x, x, x, x, x, x]"
    for level in range(1, 9):
        text = f"&l{level} [{text}, {', '.join([f'*l{level - 1}'] * 8)}]"
    return text


def test_a_value_shown_in_an_error_costs_the_same_however_large_it_is(tmp_path, capsys):
    shared = list(range(5))
    for _ in range(40):  # 5 * 2^40 leaves if walked: a repr() of it would never finish
        shared = [shared, shared]
    from kd_ops.config.loading import config_from_dict

    with pytest.raises(ConfigError, match=r"seed = \[\[\[") as err:
        config_from_dict({"seed": shared})
    assert len(str(err.value)) < 400


def test_a_config_that_is_not_utf8_names_the_byte_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 0\nregistry:\n  name: café\n".encode("latin-1"))
    err = _distill_error(capsys, [str(path)])
    assert f"config {path} is not UTF-8 text: byte 0xe9 at line 3" in err
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_configs_over_the_size_limit_and_thousands_of_bad_keys(tmp_path, capsys):
    from kd_ops.config.loading import MAX_CONFIG_BYTES, MAX_ERROR_LINES

    huge = tmp_path / "huge.yaml"
    huge.write_text("x" * (MAX_CONFIG_BYTES + 1))
    err = _distill_error(capsys, [str(huge)])
    assert f"{MAX_CONFIG_BYTES + 1:,} bytes, over the limit" in err
    many = tmp_path / "many.yaml"
    many.write_text("".join(f"bad_key_{i}: {i}\n" for i in range(30_000)))  # ~560 KB, under the limit
    err = _distill_error(capsys, [str(many)])
    lines = err.strip().splitlines()
    assert "bad_key_0 = 0: unknown key" in err and lines[-1].strip() == f"... and {30_000 - MAX_ERROR_LINES} more problems"
    assert len(lines) == MAX_ERROR_LINES + 2  # the heading, one screen of problems, the count
    nested = tmp_path / "nested.yaml"
    nested.write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "not valid YAML" in _distill_error(capsys, [str(nested)])
