"""Alert hooks: where a monitor's `warn` or `alert` goes (a webhook, Slack, a command, a plugin).

Delivery is best effort and isolated: a hook that fails (refused, timed out, crashed) is logged
and never stops the monitor or the other hooks. Dedupe and cooldown are per (model, reason
signal): a drift that persists is reported once per cooldown, not at every window, while a new
reason for the same model goes out at once. The last-sent times live in a small JSON file
(written atomically under a file lock), so they hold across monitor runs and processes.

Webhooks are signed when a key is configured: header `X-KD-Ops-Signature: sha256=<hex>` is the
HMAC-SHA256 of `<X-KD-Ops-Timestamp>.<raw body>`, so a receiver can reject forged and replayed
requests (the scheme Slack and Stripe use).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kd_ops.config.monitoring import AlertsConfig, CommandHook, EntryPointHook, WebhookHook
from kd_ops.core import plugins
from kd_ops.core.errors import ConfigError, first_line

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = plugins.ALERT_HOOKS
SIGNATURE_HEADER = "X-KD-Ops-Signature"
TIMESTAMP_HEADER = "X-KD-Ops-Timestamp"
STATUS_RANK = {"ok": 0, "insufficient": 0, "warn": 1, "alert": 2}


@dataclass(frozen=True)
class Reason:
    """One signal that crossed its threshold."""

    signal: str  # e.g. "share_of_drifted_features", "accuracy_slice_ink_low"
    status: str  # "warn" or "alert"
    value: float
    threshold: float
    message: str
    columns: tuple[str, ...] = ()  # a table's input columns behind the signal (drifted, unseen categories)


@dataclass(frozen=True)
class Alert:
    model_name: str
    model_version: str
    status: str
    reasons: tuple[Reason, ...]
    window: dict[str, Any] = field(default_factory=dict)  # rows, first/last time
    links: dict[str, str] = field(default_factory=dict)  # e.g. the MLflow run with the reports
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": [asdict(r) for r in self.reasons]}

    def summary(self) -> str:
        head = f"kd-ops {self.status.upper()}: {self.model_name} v{self.model_version}"
        return "\n".join([head, *(f"- {r.message}" for r in self.reasons)])


class Hook(Protocol):
    name: str

    def send(self, alert: Alert) -> None:
        """Deliver or raise; the dispatcher logs the exception and goes on."""


class HookError(RuntimeError):
    pass


# -- hooks ------------------------------------------------------------------------------------
class Webhook:
    def __init__(self, cfg: WebhookHook):
        self.cfg = cfg
        self.url = cfg.url or os.environ.get(cfg.url_env or "", "")
        if not self.url:
            raise ConfigError(f"monitor.alerts webhook: environment variable {cfg.url_env} is not set")
        # Never the URL itself in logs: a Slack webhook URL is a credential.
        self.name = f"webhook({cfg.url_env or _host(self.url)})"
        self.secret = os.environ.get(cfg.secret_env) if cfg.secret_env else None
        if cfg.secret_env and not self.secret:
            raise ConfigError(f"monitor.alerts webhook: environment variable {cfg.secret_env} is not set")

    def body(self, alert: Alert) -> bytes:
        if self.cfg.format == "slack":
            payload: dict[str, Any] = {"text": alert.summary()}
        else:
            payload = alert.to_json()
        return json.dumps(payload, sort_keys=True).encode()

    def headers(self, body: bytes) -> dict[str, str]:
        out = {"Content-Type": "application/json", "User-Agent": "kd-ops-alerts"}
        if self.secret:
            ts = str(int(time.time()))
            mac = hmac.new(self.secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            out.update({TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: f"sha256={mac}"})
        return out

    def send(self, alert: Alert) -> None:
        import requests

        body = self.body(alert)
        wait = self.cfg.backoff_s
        for attempt in range(self.cfg.retries + 1):
            try:
                r = requests.post(self.url, data=body, headers=self.headers(body), timeout=self.cfg.timeout_s)
            except requests.RequestException as exc:
                why = f"{type(exc).__name__}"
            else:
                if r.status_code < 300:
                    return
                why = f"HTTP {r.status_code}"
                if r.status_code < 500 and r.status_code != 429:
                    raise HookError(f"{self.name}: refused with {why}")  # retrying will not help
            if attempt < self.cfg.retries:
                log.warning("%s: attempt %d failed (%s); retrying in %.1f s", self.name, attempt + 1, why, wait)
                time.sleep(wait)
                wait *= 2
        raise HookError(f"{self.name}: gave up after {self.cfg.retries + 1} attempts ({why})")


def _host(url: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url).netloc or "?"


class Command:
    def __init__(self, cfg: CommandHook):
        self.cfg = cfg
        self.name = f"command({cfg.command[0]})"

    def send(self, alert: Alert) -> None:
        env = {
            **os.environ,
            "KD_OPS_ALERT_STATUS": alert.status,
            "KD_OPS_MODEL": alert.model_name,
            "KD_OPS_MODEL_VERSION": alert.model_version,
        }
        try:
            done = subprocess.run(
                self.cfg.command,
                input=json.dumps(alert.to_json()).encode(),
                env=env,
                capture_output=True,
                timeout=self.cfg.timeout_s,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HookError(f"{self.name}: {type(exc).__name__}: {exc}") from None
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise HookError(f"{self.name}: exit code {done.returncode} {tail[0][:200]}")


def _entry_point_hook(cfg: EntryPointHook) -> Hook:
    """The hook an installed package declares in `kd_ops.alert_hooks`: a class or factory called
    with the entry's params. A hook that is missing or fails to load is a `ConfigError` naming
    the distribution, the entry point and why (kd_ops.core.plugins)."""
    found = {ep.name: ep for ep in plugins.installed(ENTRY_POINT_GROUP)}
    if cfg.name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise ConfigError(f"monitor.alerts entry_point {cfg.name!r}: not in group {ENTRY_POINT_GROUP} ({known})")
    ep = found[cfg.name]
    try:
        target = ep.load()
    except Exception as exc:  # noqa: BLE001 - a plugin's failure is the user's to fix, said once
        raise plugins.PluginError(
            f"monitor.alerts entry_point {cfg.name!r}: {plugins.describe(ep)}: "
            f"failed to import: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    hook = target(**cfg.params)  # a class or factory taking the params, giving an object with send()
    if not callable(getattr(hook, "send", None)):
        raise ConfigError(f"monitor.alerts entry_point {cfg.name!r}: {target!r} gave an object without send()")
    if not hasattr(hook, "name"):
        hook.name = f"entry_point({cfg.name})"
    return hook


def build_hooks(cfg: AlertsConfig) -> list[Hook]:
    """The configured hooks, ready to send; `ConfigError` for a missing variable or plugin."""
    out: list[Hook] = []
    for spec in cfg.hooks:
        if isinstance(spec, WebhookHook):
            out.append(Webhook(spec))
        elif isinstance(spec, CommandHook):
            out.append(Command(spec))
        else:
            out.append(_entry_point_hook(spec))
    return out


# -- dispatch with dedupe and cooldown --------------------------------------------------------
@dataclass
class Delivery:
    sent: list[str] = field(default_factory=list)  # hook names that delivered
    failed: dict[str, str] = field(default_factory=dict)  # hook name -> why
    suppressed: list[str] = field(default_factory=list)  # reason signals inside their cooldown
    alert: Alert | None = None  # what was sent (only the reasons not suppressed)


class Dispatcher:
    def __init__(self, cfg: AlertsConfig, hooks: list[Hook] | None = None):
        self.cfg = cfg
        self.hooks = build_hooks(cfg) if hooks is None else hooks
        self.state_path = Path(cfg.state_file).expanduser()

    def _key(self, model: str, signal: str) -> str:
        return f"{model}\t{signal}"

    def _load(self) -> dict[str, float]:
        try:
            return {k: float(v) for k, v in json.loads(self.state_path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}  # no state yet, or unreadable: better one alert too many than one too few

    def _save(self, state: dict[str, float]) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, sort_keys=True))
        os.replace(tmp, self.state_path)

    def dispatch(self, alert: Alert, now: float | None = None) -> Delivery:
        """Send `alert` to every hook, minus reasons sent for this model within the cooldown."""
        from filelock import FileLock

        out = Delivery()
        if STATUS_RANK.get(alert.status, 0) < STATUS_RANK[self.cfg.notify_on]:
            return out
        now = time.time() if now is None else now
        cooldown = self.cfg.cooldown_minutes * 60
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.state_path) + ".lock", timeout=30):
            state = self._load()
            fresh = []
            for reason in alert.reasons:
                last = state.get(self._key(alert.model_name, reason.signal))
                if last is not None and now - last < cooldown:
                    out.suppressed.append(reason.signal)
                else:
                    fresh.append(reason)
            if not fresh:
                return out
            out.alert = Alert(**{**alert.__dict__, "reasons": tuple(fresh)})
            for hook in self.hooks:
                try:
                    hook.send(out.alert)
                    out.sent.append(hook.name)
                except Exception as exc:  # noqa: BLE001 - one hook never stops the others
                    out.failed[hook.name] = first_line(exc)
                    log.error("alert hook %s failed: %s", hook.name, out.failed[hook.name])
            if out.sent or not self.hooks:  # nobody reached: try again at the next window
                for reason in fresh:
                    state[self._key(alert.model_name, reason.signal)] = now
                self._save(state)
        return out
