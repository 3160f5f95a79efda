"""Metrics of the lookup service: each event is recorded once, here, and exported two ways.

- **Through Ray's metrics path** (``ray.serve.metrics``, tagged with the deployment, replica and
  application): every node's metrics agent exports its replicas' series, with Ray's ``ray_``
  prefix (``ray_raycurv_serve_requests_total{replica=...}``), so a Prometheus that scrapes each
  node's metrics export port counts every replica exactly once; sum over ``replica`` for the
  service. Requests and rows are handed to Ray in batches by :meth:`ServeMetrics.flush` (the API
  calls it every second), off the request path; table events go to Ray at once.
- **GET /metrics**: the same numbers as this replica alone has them (the replica that answered the
  scrape), in Prometheus text, under the unprefixed names: a quick look at one replica, not a
  service total.

Gauges (tables loaded, rows per run) are per replica: aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from ray.serve import metrics as ray_metrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST
PENDING_LIMIT = 10_000  # latencies held for Ray before a flush is forced


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the service: its name (Prometheus adds ``_total`` to a counter's samples,
    Ray's export also the ``ray_`` prefix), kind, help text and tags."""

    name: str
    kind: str  # counter, gauge or histogram
    help: str
    tags: tuple[str, ...] = ()


REQUESTS = MetricSpec("raycurv_serve_requests", "counter",
                      "HTTP requests answered, by route template, method and status",
                      ("route", "method", "status"))
LATENCY = MetricSpec("raycurv_serve_request_duration_seconds", "histogram",
                     "time from request to response inside the replica, by route template",
                     ("route",))
ROWS = MetricSpec("raycurv_serve_rows_returned", "counter",
                  "score-table rows sent in responses, by route", ("route",))
TABLES = MetricSpec("raycurv_serve_tables_loaded", "gauge", "runs with a table currently serving")
TABLE_ROWS = MetricSpec("raycurv_serve_table_rows", "gauge", "rows of the table serving each run",
                        ("run",))
TABLE_LOADS = MetricSpec("raycurv_serve_table_loads", "counter",
                         "tables loaded and swapped in, by run", ("run",))
RELOAD_FAILURES = MetricSpec("raycurv_serve_reload_failures", "counter",
                             "table versions refused (invalid or unreadable), by run", ("run",))
SERVE_METRICS = (REQUESTS, LATENCY, ROWS, TABLES, TABLE_ROWS, TABLE_LOADS, RELOAD_FAILURES)


def _local(spec: MetricSpec, registry: CollectorRegistry):
    """The prometheus_client metric of ``spec`` in ``registry`` (this replica's view)."""
    if spec.kind == "histogram":
        return Histogram(spec.name, spec.help, spec.tags, buckets=LATENCY_BUCKETS,
                         registry=registry)
    kind = Counter if spec.kind == "counter" else Gauge
    return kind(spec.name, spec.help, spec.tags, registry=registry)


def _ray(spec: MetricSpec):
    """The Ray Serve metric of ``spec`` (tagged with deployment, replica and application too)."""
    if spec.kind == "histogram":
        return ray_metrics.Histogram(spec.name, spec.help, boundaries=list(LATENCY_BUCKETS),
                                     tag_keys=spec.tags)
    kind = ray_metrics.Counter if spec.kind == "counter" else ray_metrics.Gauge
    return kind(spec.name, spec.help, tag_keys=spec.tags)


class ServeMetrics:
    """The service's metrics in one replica: recorded here, shown by :meth:`exposition`, and
    handed to Ray's metrics path by :meth:`flush` when built with ``export_to_ray``."""

    def __init__(self, *, export_to_ray: bool = False,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        self._local = {spec.name: _local(spec, self.registry) for spec in SERVE_METRICS}
        self._ray = {spec.name: _ray(spec) for spec in SERVE_METRICS} if export_to_ray else None
        self._children: dict[tuple, tuple] = {}
        self._requests: dict[tuple[str, str, str], int] = {}
        self._rows: dict[str, int] = {}
        self._latencies: list[tuple[str, float]] = []

    def value(self, spec: MetricSpec, *tags: str) -> float:
        """This replica's current value of a counter or gauge (tests, debugging)."""
        metric = self._local[spec.name]
        return (metric.labels(*tags) if tags else metric)._value.get()

    # --- the request path: local at once, Ray at the next flush ----------------------------

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request."""
        key = (route, method, str(status))
        children = self._children.get(key)
        if children is None:
            children = (self._local[REQUESTS.name].labels(*key),
                        self._local[LATENCY.name].labels(route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if self._ray is not None:
            self._requests[key] = self._requests.get(key, 0) + 1
            self._latencies.append((route, seconds))
            if len(self._latencies) >= PENDING_LIMIT:
                self.flush()

    def rows(self, route: str, count: int) -> None:
        """``count`` score-table rows sent by ``route``."""
        self._local[ROWS.name].labels(route).inc(count)
        if self._ray is not None:
            self._rows[route] = self._rows.get(route, 0) + count

    def flush(self) -> None:
        """Hand the requests, latencies and rows recorded since the last flush to Ray."""
        if self._ray is None:
            return
        requests, self._requests = self._requests, {}
        rows, self._rows = self._rows, {}
        latencies, self._latencies = self._latencies, []
        for (route, method, status), count in requests.items():
            self._ray[REQUESTS.name].inc(count, {"route": route, "method": method,
                                                 "status": status})
        for route, seconds in latencies:
            self._ray[LATENCY.name].observe(seconds, {"route": route})
        for route, count in rows.items():
            if count:
                self._ray[ROWS.name].inc(count, {"route": route})

    # --- table events: rare, straight to both ---------------------------------------------

    def tables(self, loaded: int) -> None:
        """How many runs have a table serving."""
        self._local[TABLES.name].set(loaded)
        if self._ray is not None:
            self._ray[TABLES.name].set(loaded)

    def table_loaded(self, run: str, rows: int) -> None:
        """A table of ``rows`` rows was loaded and swapped in for ``run``."""
        self._local[TABLE_LOADS.name].labels(run).inc()
        self._local[TABLE_ROWS.name].labels(run).set(rows)
        if self._ray is not None:
            self._ray[TABLE_LOADS.name].inc(1, {"run": run})
            self._ray[TABLE_ROWS.name].set(rows, {"run": run})

    def reload_failed(self, run: str) -> None:
        """A new version of ``run``'s table was refused."""
        self._local[RELOAD_FAILURES.name].labels(run).inc()
        if self._ray is not None:
            self._ray[RELOAD_FAILURES.name].inc(1, {"run": run})

    def exposition(self) -> bytes:
        """This replica's metrics in the Prometheus text format."""
        return generate_latest(self.registry)


def build_metrics(*, export_to_ray: bool = False) -> ServeMetrics:
    """The metrics of one replica (a registry of their own, so instances never clash);
    ``export_to_ray`` inside a Serve replica."""
    return ServeMetrics(export_to_ray=export_to_ray)
