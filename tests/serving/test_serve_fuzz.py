"""`kd-ops serve` fuzzed from its own OpenAPI schema (schemathesis 4), loaded from a real server
process on 127.0.0.1: every response has a documented status code, content type and body, none is
a 5xx, and every prediction answered 200 by /predict or /invocations is in the log afterwards.

Each operation gets bounded, derandomized examples (the same cases every run with the pinned
hypothesis): bodies that fit the schema, and for the POST routes bodies that do not. The schema
carries the served version's row width and class count, so many generated rows are scored.

Schemathesis's own `@schema.parametrize()` on a lazily loaded schema (`schemathesis.pytest.
from_fixture`, needed because the server starts in a fixture) fails on pytest 9.2 (it sets
`request.node._nodeid`, which pytest 9.2 no longer has); its hypothesis strategies do not."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.generation.feedback import NO_FEEDBACK
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from kd_ops.prediction_log.reader import read_predictions

from .test_serve import TOKEN, registry, start_server  # noqa: F401 (registry: the module's fixture)

pytestmark = pytest.mark.slow

EXAMPLES = 60  # per operation and mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]  # a body the schema forbids is a 4xx
OPERATIONS = [
    ("POST", "/predict"),
    ("POST", "/invocations"),
    ("POST", "/feedback"),
    ("GET", "/health"),
    ("GET", "/model"),
    ("GET", "/metrics"),
]
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"  # a GET without parameters has none
]


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):  # noqa: F811
    server = start_server(registry, tmp_path_factory.mktemp("fuzz"))
    yield server
    server.proc.stop()


@pytest.fixture(scope="module")
def api(served):
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json", timeout=30)


def test_the_schema_documents_every_route(api):
    found = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_every_response_is_documented_none_is_a_5xx_and_every_answer_is_logged(
    api, served, registry, method, path, mode  # noqa: F811
):
    answered: list[str] = []  # prediction ids of every 200
    checks = NEGATIVE_CHECKS if mode == GenerationMode.NEGATIVE else CHECKS
    known = [p["id"] for p in served.predict(registry["x"][:4]).json()["predictions"]]  # for /feedback
    statuses: dict[int, int] = {}

    @given(case=api[path][method].as_strategy(mode, feedback=NO_FEEDBACK))  # the cases depend on the seed only
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    def fuzz(case) -> None:
        feedback = path == "/feedback" and mode == GenerationMode.POSITIVE and isinstance(case.body, dict)
        labels = case.body.get("labels") if feedback else None
        if isinstance(labels, list) and len(labels) % 2 == 0:  # half the label lists name real predictions
            for i, label in enumerate(labels):
                if isinstance(label, dict) and "prediction_id" in label:
                    label["prediction_id"] = known[i % len(known)]
        response = case.call_and_validate(
            base_url=served.url, headers={"Authorization": f"Bearer {TOKEN}"}, checks=checks, timeout=60
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code == 200 and path == "/predict":
            answered.extend(p["id"] for p in response.json()["predictions"])
        elif response.status_code == 200 and path == "/invocations":
            answered.extend(response.json()["prediction_ids"])

    fuzz()
    print(f"{method} {path} {mode.value}: statuses {dict(sorted(statuses.items()))}, {len(answered)} rows answered")
    if path in ("/predict", "/invocations"):
        if mode == GenerationMode.POSITIVE:
            assert answered, f"no 200 among {sorted(statuses)}: the fuzzer never reached the model"
        stored = read_predictions(served.store, ids=answered) if answered else None
        missing = set(answered) - (set(stored["id"]) if stored is not None else set())
        assert not missing, f"{len(missing)} of {len(answered)} answered predictions are not in the log"
