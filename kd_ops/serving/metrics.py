"""Prometheus metrics of `kd-ops serve`, at `GET /metrics` (`kd-ops serve --no-metrics`: none).

Two kinds of series, so that a request pays for as little as possible:

- counted on the request path by `MetricsMiddleware` (outermost, so a request refused for its
  Host header is counted too): O(1) per request, nothing per row, into counters bound once per
  route and status; likewise the log's commit latency, as each write is acknowledged
  (`PredictionLog.on_commit`);
- read at scrape time from what the server counts anyway (the served version, the alias swaps,
  the prediction log's queue and commits, the shadow teacher's counters), so they cost nothing
  between scrapes.

The request-path counters are plain integers and bucket lists (`_Endpoint`, `_Histogram`), not
prometheus_client's `Counter` and `Histogram`, whose every value takes a lock: everything that
updates them runs on the server's event loop (one thread), and so does the scrape that reads
them. Recording a request into them costs ~0.35 µs, into prometheus_client's children ~1.5 µs
(a tight loop on the 2-core bench machine); the whole instrumentation, middleware included, adds
~4 µs per request in the app (with prometheus_client's children ~8 µs), beside ~550 µs of server
CPU per logged prediction. They are exposed through prometheus_client all the same
(`ServerCollector`, its metric families, exposition and content negotiation).

Series (all prefixed `kd_ops_`):

    kd_ops_requests_total{endpoint,status}        requests answered, by route and HTTP status
                                                  (refusals too: 400 Host, 401, 413, 415, 422, 503)
    kd_ops_rows_total{endpoint,status}            rows a request carried (/feedback: labels), counted
                                                  once its body parsed; a request refused before
                                                  that (400, 413, 415, a body of the wrong shape) has none
    kd_ops_request_seconds{endpoint}              histogram: from the request's arrival to its answer's last byte
    kd_ops_served_model_info{name,version,alias}  1 for the version being served (one series)
    kd_ops_alias_swaps_total                      versions swapped in by the alias watcher
    kd_ops_prediction_log_queue_depth             log writes sent and not yet acknowledged
    kd_ops_prediction_log_commit_seconds          histogram: a write's submission to its commit's ack
    kd_ops_prediction_log_commits_total           commits of the log writer
    kd_ops_prediction_log_failures_total          commits the store refused (each a 503 or a lost shadow row)
    kd_ops_prediction_log_rows_total              rows committed to the log
    kd_ops_prediction_log_up                      1 while the log writer runs, 0 once it is gone
    kd_ops_shadow_rows_total                      rows the shadow teacher scored
    kd_ops_shadow_agreements_total                of those, rows where teacher and student agree
                                                  (agreement = rate of this / rate of shadow_rows)
    kd_ops_shadow_dropped_requests_total          requests not shadowed: the teacher's queue was full
    kd_ops_shadow_failed_rows_total               rows the teacher could not score (or log)
    kd_ops_shadow_queue_depth                     requests waiting for the teacher

The log series are absent with `--no-log`, the shadow ones without `--shadow-fraction`.

One `CollectorRegistry` per app, never prometheus_client's process-wide default: a process may
build several apps (the tests do), and each must export its own requests and state only, where
on the default registry each would export them all (and a metric name can be registered once).

What `/metrics` never shows: request bodies or any value in them (slices included), tokens,
the store or tracking URL, error messages (they quote inputs). Labels carry the route template
(never the raw path: a path is the client's choice, so its cardinality is unbounded), the status
code, and the served model's registered name, version and alias.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# Request latency: a digits row is answered in ~1 ms, a committed one in 2-10 ms, a large batch
# in up to seconds; finer at the low end, where the served traffic is.
REQUEST_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
# Submission to acknowledgement of a log write: paced sends (1 ms) plus an fsynced commit; the
# log fails a write it has not acknowledged within 30 s (`PredictionLog.COMMIT_TIMEOUT_S`).
COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30)
OTHER = "other"  # the endpoint label of a path no route matched (a 404, or a refused Host on one)
ROWS_KEY = "kd_ops.rows"  # where a handler leaves the number of rows its request carried (`count_rows`)


def count_rows(request: Any, n: int) -> None:
    """Note that `request` (a Starlette request) carries `n` rows, for `kd_ops_rows_total`; one
    dict assignment in its ASGI scope, so the handlers call it whether metrics are on or not."""
    request.scope[ROWS_KEY] = n


class _Histogram:
    """One histogram series: a count per bucket (`bisect`, no loop over the buckets) and the sum.
    Updated and read on the event loop only (see the module docstring): no lock."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # `le`: a value on a bound counts in it
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, as the exposition writes them, `+Inf` last."""
        out, running = [], 0
        for bound, n in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts):
            running += n
            out.append((bound, running))
        return out


class _Endpoint:
    """One route's series: its latency histogram and, per status, its request and row counts (a
    dict lookup and two additions per request). A status has a row series once it counted rows,
    so routes without rows (/health) have none."""

    __slots__ = ("name", "seconds", "requests", "rows")

    def __init__(self, name: str):
        self.name = name
        self.seconds = _Histogram(REQUEST_BUCKETS)
        self.requests: dict[int, int] = {}
        self.rows: dict[int, int] = {}

    def record(self, status: int, rows: int, seconds: float) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1
        if rows:
            self.rows[status] = self.rows.get(status, 0) + rows
        self.seconds.observe(seconds)


class ServerCollector:
    """Every series, as they are at the scrape: the request-path counts of `metrics`, and what the
    server's `state` counts itself (the served version, alias swaps, the log, the shadow teacher)."""

    def __init__(self, state: Any, metrics: ServeMetrics):
        self.state, self.metrics = state, metrics

    def collect(self) -> Iterator[Metric]:
        endpoints = list(self.metrics.endpoints.values())
        requests = CounterMetricFamily(
            "kd_ops_requests", "requests answered, by route and HTTP status", labels=["endpoint", "status"]
        )
        rows = CounterMetricFamily(
            "kd_ops_rows",
            "rows the requests carried (/feedback: labels), by route and HTTP status",
            labels=["endpoint", "status"],
        )
        seconds = HistogramMetricFamily(
            "kd_ops_request_seconds", "seconds from a request's arrival to its answer's last byte", labels=["endpoint"]
        )
        for ep in endpoints:
            for status, n in list(ep.requests.items()):
                requests.add_metric([ep.name, str(status)], n)
            for status, n in list(ep.rows.items()):
                rows.add_metric([ep.name, str(status)], n)
            seconds.add_metric([ep.name], ep.seconds.buckets(), ep.seconds.total)
        yield from (requests, rows, seconds)

        state = self.state
        current = state.current
        info = GaugeMetricFamily(
            "kd_ops_served_model_info", "the registered model version being served", labels=["name", "version", "alias"]
        )
        info.add_metric([current.name, current.version, current.alias], 1)
        yield info
        yield CounterMetricFamily("kd_ops_alias_swaps", "versions swapped in by the alias watcher", len(state.swaps))
        schema = getattr(current, "schema", None)
        if schema is not None and schema.has_text:
            truncated = CounterMetricFamily(
                "kd_ops_truncated_texts",
                "texts longer than their column's max_length, cut to it before scoring, by column",
                labels=["column"],
            )
            counts = getattr(state, "truncated_texts", {})
            for column in schema.of_kind("text"):
                name = schema.columns[column].name
                truncated.add_metric([name], counts.get(name, 0))
            yield truncated
        plog = state.log
        if plog is not None:
            commit = self.metrics.commit_seconds
            yield HistogramMetricFamily(
                "kd_ops_prediction_log_commit_seconds",
                "seconds from a prediction log write's submission to its commit's acknowledgement",
                buckets=commit.buckets(),
                sum_value=commit.total,
            )
            yield GaugeMetricFamily(
                "kd_ops_prediction_log_queue_depth",
                "prediction log writes sent and not yet acknowledged",
                plog.pending(),
            )
            yield CounterMetricFamily("kd_ops_prediction_log_commits", "commits of the log writer", plog.commits)
            yield CounterMetricFamily(
                "kd_ops_prediction_log_failures", "commits the prediction log's store refused", plog.failures
            )
            yield CounterMetricFamily("kd_ops_prediction_log_rows", "rows committed to the log", plog.rows_written)
            yield GaugeMetricFamily("kd_ops_prediction_log_up", "1 while the log writer runs", int(plog.alive))
        shadow = state.shadow
        if shadow is not None:
            yield CounterMetricFamily("kd_ops_shadow_rows", "rows the shadow teacher scored", shadow.scored)
            yield CounterMetricFamily(
                "kd_ops_shadow_agreements", "shadowed rows where teacher and student agree", shadow.agreed
            )
            yield CounterMetricFamily(
                "kd_ops_shadow_dropped_requests", "requests not shadowed: the teacher's queue was full", shadow.dropped
            )
            yield CounterMetricFamily(
                "kd_ops_shadow_failed_rows", "rows the shadow teacher could not score or log", shadow.failed
            )
            yield GaugeMetricFamily("kd_ops_shadow_queue_depth", "requests waiting for the teacher", shadow.queued())


class ServeMetrics:
    """The metrics of one app: its own registry, the request-path counts, the commit histogram."""

    def __init__(self, state: Any, paths: list[str] | tuple[str, ...] = ()):
        """`state`: the app's `ServerState`. `paths`: the paths of its routes, labelled by their
        path even when the Host guard refuses a request before routing (their latency series
        exist from the start); any other route is labelled by its template once it answers."""
        self.registry = CollectorRegistry()
        # Keyed by route (never by a client's path: their number is bounded by the app's routes).
        self.endpoints: dict[str, _Endpoint] = {p: _Endpoint(p) for p in paths if "{" not in p}
        self.commit_seconds = _Histogram(COMMIT_BUCKETS)
        self.observe_commit = self.commit_seconds.observe  # `PredictionLog.on_commit`
        self.registry.register(ServerCollector(state, self))

    def endpoint(self, scope: dict[str, Any]) -> _Endpoint:
        """The route a request went to: its path when it is one of `paths` (one dict lookup),
        else the template of the route that matched it (set in the scope by the router), else
        `other` (no route matched, or the Host guard refused it before routing)."""
        found = self.endpoints.get(scope["path"])
        if found is not None:
            return found
        name = getattr(scope.get("route"), "path", None) or OTHER
        found = self.endpoints.get(name)
        if found is None:
            found = self.endpoints[name] = _Endpoint(name)
        return found

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type, negotiated on `Accept` as prometheus_client's own
        exporters do: the text format (version 0.0.4), or OpenMetrics when the scraper asks for it."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request: status, rows (`count_rows`) and latency."""

    def __init__(self, app: Any, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 0

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            # Starlette's error middleware (outside this one) answers 500 for it.
            self.metrics.endpoint(scope).record(status or 500, scope.get(ROWS_KEY, 0), time.perf_counter() - start)
            raise
        self.metrics.endpoint(scope).record(status or 500, scope.get(ROWS_KEY, 0), time.perf_counter() - start)
