"""What the Prefect tests share: Prefect's test harness, a real temporary Prefect server."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def harness():
    import prefect.settings as ps
    from prefect.testing.utilities import prefect_test_harness

    # Heartbeats off: each flow call would otherwise wait a second for its heartbeat thread.
    with (
        prefect_test_harness(server_startup_timeout=180),
        ps.temporary_settings(updates={ps.PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield
