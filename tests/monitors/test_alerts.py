"""Alert hooks against a real HTTP receiver on 127.0.0.1, a real command, and a real entry point
discovered from package metadata on sys.path."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kd_ops.config.monitoring import AlertsConfig
from kd_ops.core.errors import ConfigError
from monitors.alerts import SIGNATURE_HEADER, TIMESTAMP_HEADER, Alert, Dispatcher, Reason


class Receiver:
    """An HTTP server that records requests; `script` lists the status (or 'sleep') per request."""

    def __init__(self, script: list = ()):
        self.requests: list[dict] = []
        self.script = list(script)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"headers": dict(self.headers), "body": body, "path": self.path})
                action = outer.script.pop(0) if outer.script else 200
                if action == "sleep":
                    time.sleep(1.5)
                    action = 200
                self.send_response(action)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _alert(*signals: str, status: str = "alert") -> Alert:
    return Alert(
        "digits-student",
        "3",
        status,
        tuple(Reason(s, status, 0.6, 0.3, f"{s} 0.6 > 0.3") for s in signals),
        window={"rows": 500},
    )


def _dispatcher(tmp_path, hooks: list[dict], **alerts) -> Dispatcher:
    cfg = AlertsConfig.model_validate({"hooks": hooks, "state_file": str(tmp_path / "state.json"), **alerts})
    return Dispatcher(cfg)


def test_webhook_posts_signed_json(receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_KEY", "s3cret")
    d = _dispatcher(tmp_path, [{"type": "webhook", "url": receiver.url, "secret_env": "HOOK_KEY"}])
    out = d.dispatch(_alert("share_of_drifted_features"))
    assert out.sent == ["webhook(127.0.0.1:%d)" % receiver.server.server_port] and not out.failed
    (req,) = receiver.requests
    body = json.loads(req["body"])
    assert body["model_name"] == "digits-student" and body["reasons"][0]["signal"] == "share_of_drifted_features"
    ts = req["headers"][TIMESTAMP_HEADER]
    expected = hmac.new(b"s3cret", ts.encode() + b"." + req["body"], hashlib.sha256).hexdigest()
    assert req["headers"][SIGNATURE_HEADER] == f"sha256={expected}"


def test_slack_body_and_url_from_the_environment(receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("SLACK_URL", receiver.url)
    d = _dispatcher(tmp_path, [{"type": "webhook", "url_env": "SLACK_URL", "format": "slack"}])
    out = d.dispatch(_alert("accuracy_slice_ink_low"))
    assert out.sent == ["webhook(SLACK_URL)"]  # the URL itself is never named
    body = json.loads(receiver.requests[0]["body"])
    assert set(body) == {"text"} and "ALERT: digits-student v3" in body["text"]
    assert "accuracy_slice_ink_low 0.6 > 0.3" in body["text"]


def test_webhook_retries_5xx_with_backoff_but_not_4xx(tmp_path):
    flaky = Receiver([503, 500, 200])
    refusing = Receiver([404])
    try:
        hooks = [
            {"type": "webhook", "url": flaky.url, "retries": 3, "backoff_s": 0.05},
            {"type": "webhook", "url": refusing.url, "retries": 3, "backoff_s": 0.05},
        ]
        out = _dispatcher(tmp_path, hooks).dispatch(_alert("x"))
        assert len(flaky.requests) == 3 and len(refusing.requests) == 1
        assert len(out.sent) == 1 and "HTTP 404" in next(iter(out.failed.values()))
    finally:
        flaky.close()
        refusing.close()


def test_a_failing_hook_never_stops_the_others(receiver, tmp_path):
    slow = Receiver(["sleep"])
    try:
        hooks = [
            {"type": "webhook", "url": slow.url, "timeout_s": 0.3, "retries": 0},
            {"type": "webhook", "url": "http://127.0.0.1:9/nothing-listens", "retries": 1, "backoff_s": 0.01},
            {"type": "command", "command": [sys.executable, "-c", "import sys; sys.exit(3)"]},
            {"type": "webhook", "url": receiver.url},
        ]
        out = _dispatcher(tmp_path, hooks).dispatch(_alert("x"))
        assert len(out.failed) == 3 and len(out.sent) == 1
        assert any("ReadTimeout" in why for why in out.failed.values())
        assert any("exit code 3" in why for why in out.failed.values())
        assert len(receiver.requests) == 1
    finally:
        slow.close()


def test_command_gets_the_alert_on_stdin(tmp_path):
    sink = tmp_path / "got.json"
    code = f"import sys, os; open({str(sink)!r}, 'w').write(os.environ['KD_OPS_MODEL'] + sys.stdin.read())"
    out = _dispatcher(tmp_path, [{"type": "command", "command": [sys.executable, "-c", code]}]).dispatch(_alert("x"))
    assert out.sent and sink.read_text().startswith("digits-student{")
    assert json.loads(sink.read_text().removeprefix("digits-student"))["status"] == "alert"


def test_entry_point_hooks_are_discovered_from_installed_metadata(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "kd_ops_demo_hook-1.0.dist-info").mkdir(parents=True)
    (pkg / "kd_ops_demo_hook-1.0.dist-info" / "METADATA").write_text("Name: kd-ops-demo-hook\nVersion: 1.0\n")
    (pkg / "kd_ops_demo_hook-1.0.dist-info" / "entry_points.txt").write_text(
        "[kd_ops.alert_hooks]\ndemo = kd_ops_demo_hook:Hook\n"
    )
    (pkg / "kd_ops_demo_hook.py").write_text(
        "import json\n"
        "class Hook:\n"
        "    def __init__(self, path):\n        self.path = path\n"
        "    def send(self, alert):\n        open(self.path, 'w').write(json.dumps(alert.to_json()))\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    sink = tmp_path / "plugin.json"
    out = _dispatcher(tmp_path, [{"type": "entry_point", "name": "demo", "params": {"path": str(sink)}}]).dispatch(
        _alert("x")
    )
    assert out.sent == ["entry_point(demo)"] and json.loads(sink.read_text())["model_version"] == "3"
    with pytest.raises(ConfigError, match="'nope': not in group kd_ops.alert_hooks \\(demo\\)"):
        _dispatcher(tmp_path, [{"type": "entry_point", "name": "nope"}])


def test_dedupe_and_cooldown_per_model_and_reason(receiver, tmp_path):
    d = _dispatcher(tmp_path, [{"type": "webhook", "url": receiver.url}], cooldown_minutes=10)
    t0 = 1_000_000.0
    assert d.dispatch(_alert("drift"), now=t0).sent
    again = d.dispatch(_alert("drift"), now=t0 + 60)
    assert not again.sent and again.suppressed == ["drift"]
    both = d.dispatch(_alert("drift", "accuracy_slice_ink_low"), now=t0 + 120)  # a new reason goes out alone
    assert [r.signal for r in both.alert.reasons] == ["accuracy_slice_ink_low"] and both.suppressed == ["drift"]
    other_model = Alert("other-student", "1", "alert", _alert("drift").reasons)
    assert d.dispatch(other_model, now=t0 + 120).sent  # cooldown is per model
    assert d.dispatch(_alert("drift"), now=t0 + 601).sent  # cooldown over
    # The state survives a new dispatcher (a new monitor run).
    assert _dispatcher(tmp_path, [{"type": "webhook", "url": receiver.url}], cooldown_minutes=10).dispatch(
        _alert("drift"), now=t0 + 700
    ).suppressed == ["drift"]
    assert len(receiver.requests) == 4


def test_nothing_is_recorded_when_no_hook_delivered(tmp_path):
    d = _dispatcher(tmp_path, [{"type": "webhook", "url": "http://127.0.0.1:9/x", "retries": 0}])
    assert d.dispatch(_alert("drift"), now=1.0).failed
    assert not (tmp_path / "state.json").exists()  # the next window tries again


def test_warn_is_sent_only_when_asked(receiver, tmp_path):
    hooks = [{"type": "webhook", "url": receiver.url}]
    assert not _dispatcher(tmp_path, hooks).dispatch(_alert("drift", status="warn")).sent
    assert _dispatcher(tmp_path, hooks, notify_on="warn").dispatch(_alert("drift", status="warn")).sent


def test_missing_environment_variables_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_URL", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_URL is not set"):
        _dispatcher(tmp_path, [{"type": "webhook", "url_env": "NOT_SET_URL"}])
