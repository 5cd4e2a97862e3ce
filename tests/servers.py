"""Real server processes for tests: `flows.processes.Service`, failing the test (with the server's
output) instead of raising when a server exits or never becomes healthy."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests

from flows.processes import Service, ServiceError, free_port

__all__ = ["ServerProcess", "free_port", "mlflow_server"]


class ServerProcess(Service):
    def wait_healthy(
        self, url: str, healthy: Callable[[requests.Response], bool], timeout: float = 180, request_timeout: float = 5
    ) -> None:
        try:
            super().wait_healthy(url, healthy, timeout, request_timeout)
        except ServiceError as exc:
            pytest.fail(f"server {exc}")


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[tuple[str, int]]:
    """A real `mlflow server` on 127.0.0.1, SQLite and artifacts under `root`: its URL and port."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
    ]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    proc = ServerProcess([*cmd, "--workers", "1"], root / "server.log", env={"MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_healthy(f"{url}/health", lambda r: r.text.strip() == "OK")
        yield url, port
    finally:
        proc.stop()
