"""What a server holds: its settings, the served version, the prediction log and the shadow teacher."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_ops.core.errors import ConfigError, first_line
from kd_ops.prediction_log.client import PredictionLog
from kd_ops.prediction_log.store import (
    DEFAULT_STORE,
    utcnow,
)
from kd_ops.serving.served_model import ServedModel, load_version, resolve_alias
from kd_ops.serving.shadow import ShadowScorer

log = logging.getLogger(__name__)


TOKEN_ENV = "KD_OPS_TOKEN"
RELOAD_AFTER_S = 300.0  # a promoted version that failed to load is tried again after this long
DEFAULT_TOKEN_FILE = ".kd-ops/serve-token"


# -- server state ------------------------------------------------------------------------------
@dataclass
class ServeSettings:
    name: str
    alias: str = "champion"
    tracking_uri: str = "sqlite:///mlflow.db"
    store: str = DEFAULT_STORE
    log_predictions: bool = True
    poll_interval_s: float = 10.0
    shadow_fraction: float = 0.0
    teacher_uri: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    token: str | None = None
    sqlite_sync: str = "FULL"
    seed: int | None = None
    # --allow-pickle: load versions (and the shadow teacher) whose files run code when loaded.
    allow_pickle: bool = False
    # Host header names answered besides the bound host (and, bound to loopback, the loopback names).
    allowed_hosts: list[str] = field(default_factory=list)
    # Prometheus metrics at /metrics (`--no-metrics`: no route and no instrumentation at all).
    metrics: bool = True

    def check(self) -> None:
        if not 0.0 <= self.shadow_fraction <= 1.0:
            raise ConfigError(f"--shadow-fraction must be within [0, 1], got {self.shadow_fraction}")
        if self.shadow_fraction > 0 and not self.log_predictions:
            raise ConfigError("--shadow-fraction needs the prediction log (drop --no-log)")
        if self.poll_interval_s <= 0:
            raise ConfigError(f"--poll-interval must be positive, got {self.poll_interval_s}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        if self.sqlite_sync.upper() not in ("FULL", "NORMAL"):
            raise ConfigError(f"--sqlite-sync must be FULL or NORMAL, got {self.sqlite_sync!r}")


@dataclass
class ServerState:
    settings: ServeSettings
    client: Any
    current: ServedModel
    log: PredictionLog | None
    shadow: ShadowScorer | None
    swaps: list[dict[str, str]] = field(default_factory=list)
    watch_checked: str | None = None
    watch_error: str | None = None
    served_rows: int = 0
    truncated_texts: dict[str, int] = field(default_factory=dict)  # text column -> texts cut to max_length

    @classmethod
    def start(cls, settings: ServeSettings) -> "ServerState":
        """Load the model: what can fail for a reason the user can fix fails here, before the port opens."""
        from kd_ops.registry.tracking import open_tracking

        settings.check()
        # Sets the process's tracking URI too: the model download and the shadow teacher's go there.
        client = open_tracking(settings.tracking_uri, "--tracking-uri")
        if len(settings.name) > 256:
            raise ConfigError("NAME: the prediction log keeps model names of at most 256 characters")
        version = resolve_alias(client, settings.name, settings.alias)
        current = load_version(client, settings.name, version, settings.alias, allow_pickle=settings.allow_pickle)
        if settings.shadow_fraction > 0 and not (settings.teacher_uri or current.teacher_uri):
            raise ConfigError(f"--shadow-fraction: {current.uri} names no teacher in its lineage; pass --teacher URI")
        return cls(settings, client, current, None, None)

    async def open_log(self) -> None:
        """Open the prediction log on the serving loop (its writer answers there); `ConfigError` if it cannot."""
        s = self.settings
        if not s.log_predictions:
            return
        try:
            self.log = await PredictionLog.open(s.store, sqlite_sync=s.sqlite_sync.upper())
        except ValueError as exc:
            raise ConfigError(f"--store: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy / driver / writer errors
            raise ConfigError(f"--store {masked(s.store)}: cannot open it: {first_line(exc)}") from None
        if s.shadow_fraction > 0:
            self.shadow = ShadowScorer(
                s.shadow_fraction, self.log, s.teacher_uri, seed=s.seed, allow_pickle=s.allow_pickle
            )
            uri = s.teacher_uri or self.current.teacher_uri
            if uri:
                self.shadow.unloadable(uri)  # a teacher given as an object: say so at start, not at the first request

    async def aclose(self) -> None:
        """Shadow first (it writes to the log), then the log: everything queued is committed."""
        try:
            if self.shadow:
                await asyncio.to_thread(self.shadow.close)
        finally:
            if self.log:
                await self.log.aclose()

    async def watch(self) -> None:
        """Poll the alias; load a newly promoted version beside the old one, then swap in one assignment."""
        s = self.settings
        failed: dict[str, float] = {}  # version -> when it failed to load: not downloaded again every poll
        while True:
            await asyncio.sleep(s.poll_interval_s)
            try:
                version = await asyncio.to_thread(resolve_alias, self.client, s.name, s.alias)
                if version != self.current.version and time.monotonic() - failed.get(version, -1e9) > RELOAD_AFTER_S:
                    try:
                        new = await asyncio.to_thread(
                            load_version, self.client, s.name, version, s.alias, allow_pickle=s.allow_pickle
                        )
                    except Exception:
                        failed[version] = time.monotonic()
                        raise
                    old, self.current = self.current, new
                    self.swaps.append({"from": old.version, "to": new.version, "at": new.loaded_at})
                    del old
                    # The old version was frozen out of the collector at start-up: let it go.
                    gc.unfreeze()
                    gc.collect()
                    gc.freeze()
                    log.warning("serving %s v%s (was v%s): @%s moved", s.name, new.version, old.version, s.alias)
                self.watch_checked, self.watch_error = utcnow().isoformat(timespec="seconds") + "Z", None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving the loaded version; report in /health
                self.watch_error = first_line(exc)
                log.warning("alias watch: %s (still serving v%s)", self.watch_error, self.current.version)


def masked(url: str) -> str:
    """A store URL fit for logs: the password replaced."""
    try:
        import sqlalchemy as sa

        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<unparseable URL>"


def load_token(token_file: str | os.PathLike | None) -> tuple[str, str]:
    """The feedback token and where it came from: $KD_OPS_TOKEN, else a file (created, mode 0600, if absent)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], f"${TOKEN_ENV}"
    path = Path(token_file or DEFAULT_TOKEN_FILE).expanduser()
    if path.exists():
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"--token-file {path} is empty")
        return token, str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip(), f"{path} (new)"
