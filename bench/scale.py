"""Memory and throughput of the data plane as N grows: a synthetic Parquet dataset (32x32x3 PNG
images, random labels, several files) scored for one epoch, at each size in a fresh process.

    python -m bench.scale [--sizes 50000,500000 --files 8 --epochs 1]

For each N it prints the driver's peak RSS, the largest peak RSS of any Ray worker process (the
training worker, the curvature actors, Ray Data's tasks; sampled every 0.2 s) and the largest
peak of private memory (RSS counts the pages of Ray's shared-memory object store that a process
reads; private memory does not), and the training and end-to-end throughput. The end-of-run
duplicate search is off here: bench/neardup.py measures it. At the smallest N it also trains the
same data held in memory (the path of the built-in datasets) and the streamed prepared dataset side
by side, training only, with the default model, and reports the ratio of their second epochs'
training throughput. The scaled runs
train and score ``--model`` (default: a tiny one, so that the data plane is what is measured).
The synthetic dataset is written by a child process. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raycurv.config import ScoreSpec, TrainSpec

GB = 1024**3


def write_dataset(folder: str, n: int, files: int, seed: int = 0) -> None:
    """``n`` random 32x32x3 PNG images with labels 0..9 in ``files`` Parquet files."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for k, rows in enumerate(np.array_split(np.arange(n), files)):
        cells = []
        for _ in rows:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG",
                                                                                    compress_level=1)
            cells.append(buf.getvalue())
        table = pa.table({"image": pa.array(cells, pa.binary()),
                          "label": pa.array(rng.integers(0, 10, len(rows)))})
        pq.write_table(table, f"{folder}/part-{k:03d}.parquet", row_group_size=2048)


def _descendants(root: int) -> list[str]:
    """Process ids below ``root``: the cluster this process started (raylet, workers), not the
    processes of another Ray cluster on the same machine."""
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[pid] = f.read().rsplit(")", 1)[1].split()[1]  # field 4: the parent's pid
        except OSError:
            continue
    out = []
    for pid in parent:
        up = pid
        while up in parent and up != str(root):
            up = parent[up]
        if up == str(root) and pid != str(root):
            out.append(pid)
    return out


class PeakRss:
    """Samples the Ray worker processes (``ray::`` titles) of the cluster this process started,
    every 0.2 s until stopped; keeps each
    process's peak RSS (VmHWM) and its peak private memory (RssAnon: RSS less the pages of files
    and of Ray's shared-memory object store, which a reader maps and which RSS counts)."""

    def __init__(self) -> None:
        self.peaks: dict[int, tuple[str, int]] = {}
        self.private: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid in _descendants(os.getpid()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read().replace(b"\0", b" ").decode(errors="replace")[:60]
                    if not title.startswith("ray::"):
                        continue
                    with open(f"/proc/{pid}/status") as f:
                        fields = dict(line.split(":", 1) for line in f if ":" in line)
                    peak, anon = (int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "RssAnon"))
                except (OSError, KeyError, ValueError):
                    continue
                for store, value in ((self.peaks, peak), (self.private, anon)):
                    if value > store.get(int(pid), ("", 0))[1]:
                        store[int(pid)] = (title.strip(), value)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def largest(self, *, private: bool = False) -> tuple[str, float]:
        title, rss = max((self.private if private else self.peaks).values(), key=lambda v: v[1],
                         default=("none", 0))
        return title, rss / GB


def tiny_cnn(in_channels: int, num_classes: int):
    """A tiny model (``--model bench.scale:tiny_cnn``): one strided convolution, pooled, and a
    linear layer, so that a 500,000-image run measures the data plane rather than the model."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def one_size(n: int, files: int, epochs: int, compare: bool, model: str) -> dict:
    """In this (fresh) process: write, score, measure. Returns the figures."""
    import ray

    from raycurv.data import materialize, prepare_dataset
    from raycurv.run import score_run
    from raycurv.runfolder import RunFolder
    from raycurv.train import fit

    work = tempfile.mkdtemp(prefix="raycurv-scale-")
    try:
        # in a child process: a user's driver never holds the images it would take to write them
        subprocess.run([sys.executable, "-c", "import sys; from bench.scale import write_dataset; "
                        "write_dataset(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))",
                        f"{work}/src", str(n), str(files)], check=True)
        spec = ScoreSpec.model_validate({
            # the end-of-run duplicate search is measured on its own: bench/neardup.py
            "run_dir": f"{work}/run", "data": {"dataset": "parquet", "data_root": f"{work}/src",
                                               "duplicate_search": False},
            "train": {"epochs": epochs, "batch_size": 256, "model": model},
            "curvature": {"batch_size": 512, "actors": 2, "actor_cpus": 0.5}})
        ray.init(num_cpus=3, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
        with PeakRss() as workers:
            started = time.perf_counter()
            result = score_run(spec)
            run_s = time.perf_counter() - started
        # the high-water mark of preparing, training and scoring (before the comparison below)
        out = {"n": n, "run_s": run_s, "model": model, "driver_peak_rss_gb": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "worker_peak_rss_gb": workers.largest()[1], "worker_peak": workers.largest()[0],
            "worker_peak_private_gb": workers.largest(private=True)[1],
            "worker_peak_private": workers.largest(private=True)[0],
            "train_samples_per_s": result.train.get("train_samples_per_s"),
            "scored_samples_per_s": n * epochs / run_s}
        if compare:  # training only, streamed vs in memory, on the same prepared data, with the
            # model a default run trains (the tiny one would measure the data plane alone)
            data = materialize(prepare_dataset(spec.data, seed=0), RunFolder(spec.run_dir).data, seed=0)
            in_memory = dataclasses.replace(data, images=data.load_images(), store=None)
            # two epochs, the second's rate: the steady state, past Ray Data's start-up
            default = spec.train.model_copy(update={"model": TrainSpec().model, "epochs": 2})
            streamed_spec = spec.model_copy(update={"run_dir": f"{work}/streamed", "train": default})
            memory_spec = spec.model_copy(update={"run_dir": f"{work}/memory", "train": default})
            rates = {}
            for name, run_spec, prepared in (("streamed", streamed_spec, data),
                                             ("in_memory", memory_spec, in_memory)):
                rates[name] = fit(run_spec, prepared, None).metrics["train_samples_per_s"]
            out["throughput_vs_in_memory"] = rates["streamed"] / rates["in_memory"]
            out["train_rates"] = rates
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50000,500000")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default="bench.scale:tiny_cnn",
                        help="the model trained and scored (default: a tiny one)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.files, args.epochs, args.compare, args.model)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for n in sizes:
        child = subprocess.run([sys.executable, "-m", "bench.scale", "--one", str(n), "--files",
                                str(args.files), "--epochs", str(args.epochs), "--model", args.model,
                                *(["--compare"] if n == sizes[0] else [])],
                               capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"N={n} failed:\n{child.stderr[-4000:]}")
        results[n] = json.loads(child.stdout.strip().splitlines()[-1])
        r = results[n]
        print(f"N={n}: run {r['run_s']:.0f} s; driver peak RSS {r['driver_peak_rss_gb']:.2f} GB; "
              f"largest worker peak RSS {r['worker_peak_rss_gb']:.2f} GB ({r['worker_peak']}), "
              f"private {r['worker_peak_private_gb']:.2f} GB ({r['worker_peak_private']}); "
              f"training {r['train_samples_per_s']:.0f} samples/s", flush=True)
    first, last = results[sizes[0]], results[sizes[-1]]
    summary = {
        "driver_peak_rss_gb": {n: r["driver_peak_rss_gb"] for n, r in results.items()},
        "worker_peak_rss_gb": {n: r["worker_peak_rss_gb"] for n, r in results.items()},
        "worker_peak_private_gb": {n: r["worker_peak_private_gb"] for n, r in results.items()},
        "driver_rss_growth": last["driver_peak_rss_gb"] / first["driver_peak_rss_gb"],
        "worker_rss_growth": last["worker_peak_rss_gb"] / first["worker_peak_rss_gb"],
        "worker_private_growth": last["worker_peak_private_gb"] / first["worker_peak_private_gb"],
        "throughput_vs_in_memory": first.get("throughput_vs_in_memory"),
        "train_samples_per_s": {n: r["train_samples_per_s"] for n, r in results.items()},
        "run_s": {n: r["run_s"] for n, r in results.items()},
    }
    print(f"driver RSS growth {summary['driver_rss_growth']:.2f}x, largest worker RSS growth "
          f"{summary['worker_rss_growth']:.2f}x ({sizes[-1] // sizes[0]}x the data); streamed "
          f"training at {summary['throughput_vs_in_memory']:.2f}x the in-memory path")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
