"""Helpers of the serve tests: small score tables, one Serve instance per session, waiting."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from raycurv.config import DataSpec, ScoreSpec
from raycurv.data import prepare_dataset
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


def write_image_run(root: Path, name: str, *, limit: int = 60, noise: float = 0.2,
                    duplicates: int = 4, epochs: int = 4, seed: int = 3) -> tuple[Path, pa.Table]:
    """A run folder whose images the service can rebuild: the record of a digits run (``limit``
    samples, injected noise and duplicates), a score table with those samples and labels and
    random scores (corrupted labels score higher), and a per-epoch table whose mean over the
    ``epochs`` is each sample's curvature. Returns the folder and the table."""
    spec = ScoreSpec(seed=seed, run_dir=str(root / name),
                     data=DataSpec(dataset="digits", limit=limit, noise=noise,
                                   duplicates=duplicates))
    data = prepare_dataset(spec.data, seed=spec.seed)
    rng = np.random.default_rng(seed)
    n = len(data)
    curvature = (rng.random(n) + data.corrupted + (data.duplicate_of >= 0)).astype(np.float32)
    table = build_table({
        "sample_id": data.sample_ids, "label": data.labels, "original_label": data.original_labels,
        "corrupted": data.corrupted, "duplicate_of": data.duplicate_of, "curvature": curvature,
        "epochs_scored": np.full(n, epochs, dtype=np.int32),
        "csl": (rng.random(n) * 3).astype(np.float32),
        "final_loss": rng.random(n).astype(np.float32),
        "final_confidence": rng.random(n).astype(np.float32), "final_pred": data.labels,
    }, {"run": name, "dataset": "digits", "n": n, "seed": seed})
    factors = np.linspace(0.5, 1.5, epochs)  # mean 1: the per-epoch values average to the score
    folder = RunFolder(spec.run_dir)
    folder.write_record({"spec": spec.model_dump(mode="json"),
                         "dataset_fingerprint": data.fingerprint, "samples": n})
    folder.write_scores(table)
    folder.write_by_epoch(pa.table({
        "sample_id": np.repeat(data.sample_ids, epochs),
        "epoch": np.tile(np.arange(epochs, dtype=np.int32), n),
        "curvature": (np.repeat(curvature, epochs) * np.tile(factors, n)).astype(np.float32)}))
    return Path(spec.run_dir), table


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


def scrape_ray_metrics() -> str:
    """What Prometheus would scrape from the session cluster's node: its metrics export port."""
    import urllib.request

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


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


def listening_sockets(pids) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that one of ``pids`` holds, read
    from Linux's /proc (IPv4 and IPv6 tables, socket inode -> owning process)."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[3] != "0A" or fields[9] not in owner:  # 0A: LISTEN
                    continue
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(family, raw), int(port, 16), owner[fields[9]]))
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (::ffff:127.0.0.1)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def process_title(pid: int) -> str:
    """What ps shows for ``pid``: its command line, or the title a Ray process gave itself."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def running(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` is a live process (not a zombie) that started at ``started`` clock ticks
    (any start time when None): a pid the kernel reused for another process is not running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] != "Z" and (started is None or fields[19] == started)
