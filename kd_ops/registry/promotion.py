"""Aliases of a registered student: `challenger` -> `champion`, the former champion -> `previous`.

The alias `champion` is only ever moved, never deleted: MLflow sets an alias in one call, so a
reader (the server polling it) sees the old champion or the new one, never none. Promotions
and rollbacks of one model also take a file lock beside a SQLite store, so two racing calls
cannot both read the same old champion and lose the `previous` link. A tracking server offers
no lock; there the champion still never disappears, but two simultaneous promotions may leave
`previous` naming the older of them.

Each model keeps the versions that were champion, in order, in the registered-model tag
`kd_ops.champion_history`, so `rollback` can step back more than once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kd_ops.core.errors import ConfigError
from kd_ops.registry.gates import TAG_GATES
from kd_ops.registry.tracking import open_tracking, sqlite_path

log = logging.getLogger(__name__)
CHAMPION = "champion"
PREVIOUS = "previous"
TAG_HISTORY = "kd_ops.champion_history"
_THREAD_LOCK = threading.Lock()


class PromotionError(ConfigError):
    """A promotion or rollback that must not happen; nothing was changed."""


@dataclass
class AliasState:
    name: str
    champion: str | None
    previous: str | None

    def to_json(self) -> dict:
        return {"name": self.name, CHAMPION: self.champion, PREVIOUS: self.previous}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _model_lock(uri: str, name: str):
    """Serialise alias changes of one model: a file lock beside a SQLite store, a thread lock always."""
    db = sqlite_path(uri)
    with _THREAD_LOCK:
        if db is None:
            yield
            return
        from filelock import FileLock

        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        with FileLock(str(db.resolve().parent / f".{db.name}.{safe}.promote.lock"), timeout=120):
            yield


_ABSENT = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version behind `alias`, None when it is not set; any other failure (a server error, a
    timeout) propagates: guessing "no champion" would pass the champion gate and lose `previous`."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            return None
        raise


def state(name: str, client: MlflowClient | None = None) -> AliasState:
    client = client or MlflowClient()
    return AliasState(name, _alias(client, name, CHAMPION), _alias(client, name, PREVIOUS))


def _history(client: MlflowClient, name: str) -> list[str]:
    """Former champions in order, leaving out versions deleted since."""
    tags = client.get_registered_model(name).tags
    try:
        versions = [str(v) for v in json.loads(tags.get(TAG_HISTORY, "[]"))]
    except (TypeError, ValueError):
        return []
    existing = {str(mv.version) for mv in client.search_model_versions(f"name = '{name}'")}
    return [v for v in versions if v in existing]


def _require_model(client: MlflowClient, name: str) -> None:
    """`PromotionError` if `name` is not registered; any other failure (a store away) propagates."""
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in _ABSENT:
            raise
        raise PromotionError(f"registered model {name!r} does not exist") from None


def _check_version(client: MlflowClient, name: str, version: str):
    _require_model(client, name)
    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in _ABSENT:
            raise
        raise PromotionError(f"{name!r} has no version {version!r}") from None


def promote(name: str, version: str | int, force: bool = False, uri: str | None = None) -> AliasState:
    """Make `version` the champion; its gates must have passed unless `force`.

    Refuses (PromotionError, nothing changed) when the version's recorded gates failed, or when
    it has no gate record at all and `force` is not given.
    """
    uri = uri or mlflow.get_tracking_uri()
    client = open_tracking(uri)
    version = str(version)
    mv = _check_version(client, name, version)
    verdict = mv.tags.get(TAG_GATES)
    if not force and verdict != "passed":
        why = {
            "failed": "its gates failed",
            "pending": "it is a re-distillation candidate whose gates against the champion are not decided yet",
        }.get(verdict or "", "it has no gate decision recorded")
        raise PromotionError(
            f"{name} version {version} not promoted: {why} (see the kd_ops.gate.* tags); --force overrides"
        )
    with _model_lock(uri, name):
        current = _alias(client, name, CHAMPION)
        if current == version:
            log.info("%s v%s is already @%s", name, version, CHAMPION)
            return state(name, client)
        history = _history(client, name) or ([current] if current else [])
        if current:
            client.set_registered_model_alias(name, PREVIOUS, current)
        client.set_registered_model_alias(name, CHAMPION, version)  # moved, never deleted
        client.set_registered_model_tag(name, TAG_HISTORY, json.dumps([*history, version][-50:]))
        client.set_model_version_tag(name, version, "kd_ops.promoted_at", _now())
        if force and verdict != "passed":
            client.set_model_version_tag(name, version, "kd_ops.promoted_by", "force")
        why = f"forced, gates {verdict or 'not recorded'}" if force and verdict != "passed" else "gates passed"
        log.info(
            "%s v%s is @%s now (%s; previous: %s)", name, version, CHAMPION, why, f"v{current}" if current else "none"
        )
        return state(name, client)


def rollback(name: str, uri: str | None = None) -> AliasState:
    """Champion back to `previous`; `previous` steps one further back in the history (or is removed)."""
    uri = uri or mlflow.get_tracking_uri()
    client = open_tracking(uri)
    _require_model(client, name)
    with _model_lock(uri, name):
        current, previous = _alias(client, name, CHAMPION), _alias(client, name, PREVIOUS)
        if previous is None:
            raise PromotionError(f"{name!r} has no alias {PREVIOUS!r}: nothing to roll back to")
        client.set_registered_model_alias(name, CHAMPION, previous)
        history = _history(client, name)
        while history and history[-1] != previous:
            history.pop()  # drop the rolled-back champion (and anything promoted after `previous`)
        before = history[-2] if len(history) >= 2 else None
        if before and before != previous:
            client.set_registered_model_alias(name, PREVIOUS, before)
        else:
            client.delete_registered_model_alias(name, PREVIOUS)
        client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(history or [previous]))
        if current:
            client.set_model_version_tag(name, current, "kd_ops.rolled_back_at", _now())
        log.info("%s rolled back: v%s is @%s again (was v%s)", name, previous, CHAMPION, current)
        return state(name, client)
