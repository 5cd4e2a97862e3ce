"""Real server processes for tests: `flows.processes.Service`, failing the test (with the server's
output) instead of raising when a server exits or never becomes healthy."""

from __future__ import annotations

from typing import Callable

import pytest
import requests

from flows.processes import Service, ServiceError, free_port

__all__ = ["ServerProcess", "free_port"]


class ServerProcess(Service):
    def wait_healthy(self, url: str, healthy: Callable[[requests.Response], bool], timeout: float = 180) -> None:
        try:
            super().wait_healthy(url, healthy, timeout)
        except ServiceError as exc:
            pytest.fail(f"server {exc}")
