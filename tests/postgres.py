"""A real PostgreSQL for tests (`flows.processes.Postgres`): one throw-away cluster per session,
one database per test that asks; and `store_url`, which runs a test once on SQLite and once on it."""

from __future__ import annotations

import pytest

from flows.processes import Postgres, server_bin


@pytest.fixture(scope="session")
def postgres():
    bin_dir = server_bin()
    if bin_dir is None:  # `make test` installs Debian's postgresql where it can (see Makefile)
        pytest.fail("PostgreSQL's server binaries (initdb, postgres) are not installed: apt-get install postgresql")
    server = Postgres(bin_dir)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    """A prediction-log URL: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres").database()
    return f"sqlite:///{tmp_path}/store/predictions.db"
