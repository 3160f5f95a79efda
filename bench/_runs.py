"""Helpers shared by the run-level benchmarks: timed scoring runs on a local Ray cluster."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from typing import Any

from raycurv.config import ScoreSpec, merge


def spec(base: dict[str, Any], **overrides: Any) -> ScoreSpec:
    """A run spec in a fresh temporary run folder."""
    return ScoreSpec.model_validate(merge(base, {"run_dir": tempfile.mkdtemp(prefix="raycurv-bench-"),
                                                 **overrides}))


def timed(fn, run_spec: ScoreSpec) -> float:
    """Wall seconds of ``fn(run_spec)``; the run folder is removed afterwards."""
    started = time.perf_counter()
    try:
        fn(run_spec)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(run_spec.run_dir, ignore_errors=True)


def start_ray(cpus: int) -> None:
    import ray

    ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)


def run_args(doc: str) -> argparse.Namespace:
    """Flags shared by the run-level benchmarks."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--reps", type=int, default=2, help="alternating repetitions of each side")
    return parser.parse_args()
