"""Helpers of the serve tests: small score tables, one Serve instance per session, waiting."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from raycurv.runfolder import RunFolder
from raycurv.table import build_table

_SERVE_URL: dict[str, str] = {}


def make_table(n: int = 40, *, seed: int = 0, classes: int = 3, id_step: int = 1,
               id_offset: int = 0, run: str = "test", noise: float = 0.25) -> pa.Table:
    """A contract-v1 table of ``n`` samples with random scores; ids = offset + step * i."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n).astype(np.int32)
    corrupted = rng.random(n) < noise
    original = np.where(corrupted, (label + 1) % classes, label).astype(np.int32)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    duplicate_of[: max(n // 10, 1)] = id_offset + id_step * (n - 1)
    columns = {
        "sample_id": id_offset + id_step * np.arange(n, dtype=np.int64),
        "label": label,
        "original_label": original,
        "corrupted": corrupted,
        "duplicate_of": duplicate_of,
        # noisy labels get higher curvature on average, as in the paper
        "curvature": (rng.random(n) + corrupted).astype(np.float32),
        "epochs_scored": np.full(n, 5, dtype=np.int32),
        "csl": (rng.random(n) * 3 + corrupted).astype(np.float32),
        "final_loss": rng.random(n).astype(np.float32),
        "final_confidence": rng.random(n).astype(np.float32),
        "final_pred": label,
    }
    return build_table(columns, {"run": run, "dataset": "synthetic", "n": n, "seed": seed})


def write_run(root: Path, name: str, table: pa.Table) -> Path:
    """Write ``table`` as the run folder ``root/name``; returns the table file."""
    folder = RunFolder(str(root / name))
    folder.write_scores(table)
    return Path(folder.scores)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_url() -> str:
    """Start Serve once per session on a free loopback port (on the session's Ray cluster)."""
    if "url" not in _SERVE_URL:
        from ray import serve

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _SERVE_URL["url"] = f"http://127.0.0.1:{port}"
    return _SERVE_URL["url"]


def run_app(settings, *, name: str) -> str:
    """Deploy the lookup application for ``settings`` at route prefix / and return its URL."""
    from ray import serve

    from raycurv.serve.app import build_app

    url = serve_url()
    serve.run(build_app(settings), name=name, route_prefix="/")
    return url


def wait_until(predicate: Callable[[], object], *, timeout_s: float = 20.0,
               every_s: float = 0.2) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(every_s)
