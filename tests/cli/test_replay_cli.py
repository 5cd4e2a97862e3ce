"""`kd-ops replay` refuses what it cannot replay in one line (exit 2), before any request is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_ops.cli.main import main

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        ("digits.yaml", ["--from", "2013-04", "--to", "2013-05"], "data.name = 'digits' is not a table"),
        ("flights.yaml", ["--from", "2013-06", "--to", "2013-04"], "--to '2013-04' is before --from '2013-06'"),
        ("flights.yaml", ["--from", "2015-01", "--to", "2015-02"], "holds no rows from 2015-01 to 2015-02"),
        ("flights.yaml", ["--from", "soon", "--to", "2013-05"], "--from 'soon' / --to '2013-05': not a time"),
    ],
)
def test_replay_refuses_in_one_line(config, args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KD_OPS_TOKEN", "not-used")
    # Nothing listens on this port: a request sent would fail otherwise.
    argv = ["replay", str(EXAMPLES / config), *args, "--url", "http://127.0.0.1:9", "--loop", "inline"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_feedback_without_a_token_is_refused(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("KD_OPS_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no .kd-ops/serve-token here
    argv = ["replay", str(EXAMPLES / "flights.yaml"), "--url", "http://127.0.0.1:9"]
    assert main(argv) == 2
    assert "feedback needs the server's token" in capsys.readouterr().err
