"""Long-running helper processes (a Prefect server, `kd-ops serve`, `kd-ops deploy`, a throw-away
PostgreSQL) for the demo, the benchmarks and the tests: a free port on 127.0.0.1, a new process
group, wait until healthy."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
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

    def __init__(
        self, cmd: list[str], log_path: Path, env: dict[str, str | None] | None = None, cwd: str | None = None
    ):
        """`env` is added to this process's environment; a None value removes that variable."""
        self.log_path = log_path
        self._log = open(log_path, "a")
        merged = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in merged.items() if v is not None},
            start_new_session=True,
            cwd=cwd,
        )

    def wait_healthy(
        self,
        url: str,
        healthy: Callable[[requests.Response], bool],
        timeout: float = 180,
        request_timeout: float = 5,
    ) -> None:
        """Poll `url` until `healthy(response)`; any failed request counts as "not yet" until `timeout`,
        since a server starting on a busy machine can accept a connection and answer late."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"exited with {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                if healthy(requests.get(url, timeout=request_timeout)):
                    return
            except requests.RequestException:
                pass  # refused, reset, a read timeout on a busy machine, a half-written answer: not yet
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


def server_bin() -> Path | None:
    """The directory of `initdb` and `postgres`: on PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


class Postgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1 with trust authentication, from Debian's server
    binaries; as root, the server runs as the `postgres` user (PostgreSQL refuses root)."""

    def __init__(self, bin_dir: Path):
        self.root = Path(tempfile.mkdtemp(prefix="kd-ops-pg-"))
        as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        data = self.root / "data"
        subprocess.run(
            [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        self.port = free_port()
        cmd = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1"]
        cmd += ["-k", str(self.root), "-c", "max_connections=200"]
        self.proc = Service([*as_user, *cmd], Path(tempfile.mkdtemp(prefix="kd-ops-pg-log-")) / "postgres.log")
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}"
        self._wait()

    def _wait(self, timeout: float = 60) -> None:
        import psycopg2

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres").close()
                return
            except psycopg2.OperationalError:
                if self.proc.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start: {self.proc.output()[-2000:]}") from None
                time.sleep(0.2)

    def database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg2

        name = f"t_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        conn.close()
        return f"{self.url}/{name}"

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.root, ignore_errors=True)
