"""Prometheus metrics of the lookup service, in a registry of their own (one per replica)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class ServeMetrics:
    """The service's counters, gauges and histogram, bound to ``registry``."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    rows_returned: Counter
    tables_loaded: Gauge
    table_rows: Gauge
    table_loads: Counter
    reload_failures: Counter

    def exposition(self) -> bytes:
        """Everything in the Prometheus text format."""
        return generate_latest(self.registry)


def build_metrics(*, registry: CollectorRegistry | None = None) -> ServeMetrics:
    """Create the metrics in ``registry`` (a fresh one by default, so instances never clash)."""
    registry = CollectorRegistry(auto_describe=True) if registry is None else registry
    return ServeMetrics(
        registry=registry,
        requests=Counter(
            "raycurv_serve_requests", "HTTP requests answered, by route template and status",
            ["route", "method", "status"], registry=registry),
        latency=Histogram(
            "raycurv_serve_request_duration_seconds",
            "time from request to response inside the replica, by route template",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry),
        rows_returned=Counter(
            "raycurv_serve_rows_returned", "score-table rows sent in responses, by route",
            ["route"], registry=registry),
        tables_loaded=Gauge(
            "raycurv_serve_tables_loaded", "runs with a table currently serving",
            registry=registry),
        table_rows=Gauge(
            "raycurv_serve_table_rows", "rows of the table serving each run", ["run"],
            registry=registry),
        table_loads=Counter(
            "raycurv_serve_table_loads", "tables loaded and swapped in, by run", ["run"],
            registry=registry),
        reload_failures=Counter(
            "raycurv_serve_reload_failures",
            "table versions refused (invalid or unreadable), by run", ["run"],
            registry=registry),
    )
