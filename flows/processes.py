"""Long-running helper processes (a Prefect server, `kd-ops serve`, `kd-ops deploy`) for the demo
and the loop benchmark: a free port on 127.0.0.1, a new process group, wait until healthy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import requests


class ServiceError(RuntimeError):
    """A helper process exited or did not become healthy; the message ends with its output."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`cmd` started in its own session (so a signal reaches its children too), output in `log_path`."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: str | None = None):
        self.log_path = log_path
        self._log = open(log_path, "a")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=cwd,
        )

    def wait_healthy(self, url: str, healthy: Callable[[requests.Response], bool], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"exited with {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                if healthy(requests.get(url, timeout=2)):
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.stop()
        raise ServiceError(f"did not answer {url} within {timeout:.0f} s: {self.output()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        # The whole group, even when its leader has exited: its children may not have.
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=timeout)
        self._log.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()
