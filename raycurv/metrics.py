"""Prometheus metrics of a scoring run, exported through Ray's metrics agent (scrape each node's
metrics export port while the run goes on; Ray prefixes the names with `ray_`).

Created on first use, inside the process that records them (a training worker or an actor)."""

from __future__ import annotations

from functools import cache
from typing import Any

from ray.util.metrics import Counter, Gauge


@cache
def run_metrics() -> dict[str, Any]:
    tags = ("run",)
    return {
        "epoch": Gauge("raycurv_train_epoch", "last finished training epoch (1-based)", tag_keys=tags),
        "train_loss": Gauge("raycurv_train_loss", "mean training loss of the last epoch", tag_keys=tags),
        "train_acc": Gauge("raycurv_train_accuracy", "training accuracy of the last epoch", tag_keys=tags),
        "train_rate": Gauge("raycurv_train_samples_per_second", "training throughput, last epoch",
                            tag_keys=tags),
        "lag": Gauge("raycurv_scoring_lag_epochs", "epochs handed to the curvature pool and not yet scored",
                     tag_keys=tags),
        "scored": Counter("raycurv_scored_samples", "samples scored by curvature actors (one per epoch)",
                          tag_keys=("run", "shard")),
        "score_rate": Gauge("raycurv_scoring_samples_per_second", "scoring throughput of an actor, last epoch",
                            tag_keys=("run", "shard")),
    }


def record_epoch(run: str, metrics: dict[str, Any]) -> None:
    """Training side: called by rank 0 after each epoch with its reported metrics."""
    m, tags = run_metrics(), {"run": run}
    m["epoch"].set(metrics["epoch"] + 1, tags=tags)
    m["train_loss"].set(metrics["train_loss"], tags=tags)
    m["train_acc"].set(metrics["train_acc"], tags=tags)
    m["train_rate"].set(metrics["train_samples_per_s"], tags=tags)
    if "scoring_lag" in metrics:
        m["lag"].set(metrics["scoring_lag"], tags=tags)


def record_scoring(run: str, shard: int, samples: int, seconds: float) -> None:
    """Actor side: called after scoring an epoch of a shard."""
    m, tags = run_metrics(), {"run": run, "shard": str(shard)}
    if samples:
        m["scored"].inc(samples, tags=tags)
        m["score_rate"].set(samples / max(seconds, 1e-9), tags=tags)
