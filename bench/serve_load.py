"""Load benchmark of the lookup service, side by side with a bare Ray Serve deployment and with
the same FastAPI app under plain uvicorn (no Ray), on the same machine, with its own asyncio client.

- Ray: for each Ray Serve ingress option given (default: raycurv serve's, HAProxy + throughput
  optimized), a fresh local Ray cluster runs the lookup service over a synthetic 100k-row table
  and a digits run with images, and a bare deployment that returns a constant. Each is loaded
  with single-sample GETs at 1, 16 and 64 concurrent keep-alive clients (loopback only, bounded
  in time and count); then 10,000-id batch lookups are timed (Server-Timing header, inside the
  app) and a cached 32x32 image is fetched by one client (latency p50).
- Plain: the service's own FastAPI app (raycurv.serve.api.build_api, same handlers and
  middleware) under uvicorn in a process of its own, loaded the same way.
- A 10-million-row table is loaded into the index in a separate process: seconds, and resident
  memory against the table's Arrow size.

Targets (issue 15): service >= 0.8x bare and >= 0.9x plain at 16 and 64 clients; a 10,000-id
batch < 50 ms server-side; 10M rows loaded in < 5 s at < 1.5x their Arrow size; image p50 < 20 ms
for a cached 32x32 image. Prints a table, then ONE line of JSON (vs_bare_16, vs_bare_64,
vs_plain_16, vs_plain_64, batch_10k_ms, load_10m_s, load_10m_rss_ratio, image_p50_ms, targets).

    python bench/serve_load.py [--modes proxy haproxy-throughput] [--seconds 3] [--big-rows 10000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("proxy", "throughput", "haproxy", "haproxy-throughput")
CONCURRENCY = (1, 16, 64)
HOST = "127.0.0.1"  # loopback only
MAX_REQUESTS = 50_000  # per measurement, on top of the time bound


# --- a minimal keep-alive HTTP/1.1 load generator (cheap, so the 2 cores go to the server) ---

async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunks.append(await reader.readexactly(size + 2))
            if size == 0:
                break
        body = b"".join(c[:-2] for c in chunks)
    else:
        body = b""
    return status, headers, body


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: keep-alive\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def _client(port: int, paths: list[bytes], stop_at: float, record_from: float,
                  latencies: list[float], errors: list[int], budget: list[int]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    i = random.randrange(len(paths))
    try:
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            started = time.perf_counter()
            writer.write(paths[i % len(paths)])
            i += 1
            status, headers, _ = await _read_response(reader)
            if started >= record_from:
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    errors.append(status)
            if headers.get("connection") == "close":
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
    finally:
        writer.close()


def load(port: int, paths: list[str], *, clients: int, seconds: float, warmup_s: float = 0.5
         ) -> dict[str, float]:
    """GET ``paths`` round-robin from ``clients`` keep-alive connections for ``seconds``."""
    requests = [_request("GET", p) for p in paths]
    latencies: list[float] = []
    errors: list[int] = []

    async def run() -> float:
        start = time.perf_counter()
        record_from = start + warmup_s
        stop_at = record_from + seconds
        budget = [MAX_REQUESTS]
        await asyncio.gather(*(_client(port, requests, stop_at, record_from, latencies, errors,
                                       budget) for _ in range(clients)))
        return max(time.perf_counter() - record_from, 1e-9)

    elapsed = asyncio.run(run())
    latencies.sort()
    n = len(latencies)
    return {
        "rps": round(n / elapsed, 1),
        "p50_ms": round(latencies[n // 2] * 1000, 2) if n else None,
        "p99_ms": round(latencies[min(int(n * 0.99), n - 1)] * 1000, 2) if n else None,
        "requests": n,
        "errors": len(errors),
    }


def batch_timing(port: int, path: str, ids: list[int], *, repeats: int = 8) -> dict[str, float]:
    """POST a 10,000-id lookup ``repeats`` times; median Server-Timing and client-side ms."""
    body = json.dumps({"sample_ids": ids}).encode()

    async def run() -> tuple[list[float], list[float], int]:
        reader, writer = await asyncio.open_connection(HOST, port)
        server, client = [], []
        rows = 0
        for _ in range(repeats + 1):  # the first one warms up
            started = time.perf_counter()
            writer.write(_request("POST", path, body))
            status, headers, payload = await _read_response(reader)
            assert status == 200, (status, payload[:200])
            server.append(float(headers["server-timing"].split("dur=")[1]))
            client.append((time.perf_counter() - started) * 1000)
            rows = len(json.loads(payload)["rows"])
        writer.close()
        return server[1:], client[1:], rows

    server, client, rows = asyncio.run(run())
    server.sort()
    client.sort()
    return {"server_ms": round(server[len(server) // 2], 2),
            "client_ms": round(client[len(client) // 2], 2), "rows": rows}


# --- servers: a Ray cluster per ingress option, the same app under plain uvicorn ----------------

RUNS_ENV = "RAYCURV_BENCH_RUNS"
BENCH_RUN, IMAGE_RUN = "bench", "images"
IMAGE_SIDE = 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_http(port: int, path: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                sock.sendall(_request("GET", path))
                if b" 200 " in sock.recv(200):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{path} on port {port} not ready after {timeout_s}s")


def _sample_paths(rows: int, count: int = 4096) -> list[str]:
    rng = random.Random(0)
    return [f"/v1/runs/{BENCH_RUN}/samples/{rng.randrange(rows)}" for _ in range(count)]


def image_p50(port: int, sample_ids: list[int], seconds: float) -> dict[str, float]:
    """One client fetching cached 32x32 PNGs: every image is fetched once first (the run's
    images load and the PNGs are cached), then the latency of repeated fetches."""
    paths = [f"/v1/runs/{IMAGE_RUN}/samples/{i}/image?size={IMAGE_SIDE}" for i in sample_ids]
    for path in paths:
        _wait_http(port, path)
    return load(port, paths, clients=1, seconds=seconds)


def child_mode(mode: str, runs: Path, rows: int, seconds: float, image_ids: list[int]) -> dict:
    """Measure one ingress option: bare vs service at each concurrency, the 10k batch, images."""
    from raycurv.serve.launch import apply_ingress_env

    apply_ingress_env(mode)  # before Ray starts, so every Serve process sees it
    import ray
    from ray import serve

    from raycurv.serve.app import build_app
    from raycurv.serve.settings import build_settings

    settings = build_settings(runs=[runs], reload_interval_s=60, environ={})

    @serve.deployment(ray_actor_options={"num_cpus": settings.replica_cpus},
                      max_ongoing_requests=settings.max_ongoing_requests)
    class Bare:
        """Returns a constant: the cost of Serve itself."""

        async def __call__(self, request) -> dict:
            return {"ok": 1}

    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host=HOST, log_to_driver=False)
    try:
        serve.start(http_options={"host": HOST, "port": port})
        serve.run(Bare.bind(), name="bare", route_prefix="/bare")
        serve.run(build_app(settings), name="raycurv", route_prefix="/")
        _wait_http(port, "/healthz")
        _wait_http(port, "/bare")
        paths = _sample_paths(rows)
        result: dict = {"mode": mode, "levels": {}}
        for clients in CONCURRENCY:
            bare = load(port, ["/bare"], clients=clients, seconds=seconds)
            service = load(port, paths, clients=clients, seconds=seconds)
            result["levels"][str(clients)] = {
                "bare": bare, "service": service,
                "ratio": round(service["rps"] / bare["rps"], 3) if bare["rps"] else None,
            }
        ids = [random.Random(1).randrange(rows) for _ in range(10_000)]
        result["batch_10k"] = batch_timing(port, f"/v1/runs/{BENCH_RUN}/samples:lookup", ids)
        result["image"] = image_p50(port, image_ids, seconds)
        return result
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def plain_app():
    """The service's FastAPI app over $RAYCURV_BENCH_RUNS, for uvicorn --factory (no Ray)."""
    from raycurv.serve.api import build_api
    from raycurv.serve.prometheus import build_metrics
    from raycurv.serve.registry import RunRegistry
    from raycurv.serve.settings import build_settings

    settings = build_settings(runs=[os.environ[RUNS_ENV]], reload_interval_s=60, environ={})
    metrics = build_metrics()
    registry = RunRegistry(sources=settings.runs, metrics=metrics)
    registry.refresh()
    return build_api(registry=registry, settings=settings, metrics=metrics, reload=False)


def child_plain(runs: Path, rows: int, seconds: float) -> dict:
    """The same app under uvicorn (uvloop, httptools, no access log) in a process of its own."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.serve_load:plain_app", "--factory",
         "--host", HOST, "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env={**os.environ, RUNS_ENV: str(runs), "PYTHONPATH": str(ROOT)})
    try:
        _wait_http(port, "/healthz")
        paths = _sample_paths(rows)
        return {"levels": {str(c): load(port, paths, clients=c, seconds=seconds)
                           for c in CONCURRENCY}}
    finally:
        server.terminate()
        server.wait(timeout=30)


def child_big(path: Path) -> dict:
    """Load a big table into a TableIndex: seconds, and resident memory against Arrow size."""
    from raycurv.serve.index import TableIndex

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    started = time.perf_counter()
    index = TableIndex.load(path)
    load_s = time.perf_counter() - started
    resident = rss() - before
    return {"rows": index.rows, "load_s": round(load_s, 2),
            "index_build_s": round(index.load_seconds, 2),
            "arrow_mb": round(index.arrow_bytes / 1e6, 1), "rss_mb": round(resident / 1e6, 1),
            "rss_ratio": round(resident / index.arrow_bytes, 3)}


# --- the parent: tables, children, the verdict ----------------------------------------------

def synthetic_table(rows: int, *, seed: int = 0, run: str = BENCH_RUN):
    """A contract-v1 table of ``rows`` samples, 10 classes, 10% noisy labels."""
    import numpy as np

    from raycurv.table import build_table

    rng = np.random.default_rng(seed)
    label = rng.integers(0, 10, rows).astype(np.int32)
    corrupted = rng.random(rows) < 0.1
    return build_table({
        "sample_id": np.arange(rows, dtype=np.int64), "label": label,
        "original_label": np.where(corrupted, (label + 1) % 10, label).astype(np.int32),
        "corrupted": corrupted, "curvature": (rng.random(rows) + corrupted).astype(np.float32),
        "epochs_scored": np.full(rows, 10, dtype=np.int32),
        "csl": rng.random(rows).astype(np.float32),
        "final_loss": rng.random(rows).astype(np.float32),
        "final_confidence": rng.random(rows).astype(np.float32), "final_pred": label,
    }, {"run": run, "dataset": "synthetic", "n": rows})


def write_runs(work: Path, rows: int) -> tuple[Path, list[int]]:
    """The served runs: a synthetic table, and a digits run whose images the service rebuilds
    (tests.serve_support's, scores random); returns the folder and some of its image ids."""
    from raycurv.runfolder import RunFolder
    from tests.serve_support import write_image_run

    runs = work / "runs"
    RunFolder(str(runs / BENCH_RUN)).write_scores(synthetic_table(rows))
    _, table = write_image_run(runs, IMAGE_RUN, limit=None, noise=0.1, duplicates=0)
    return runs, table.column("sample_id").to_pylist()[:64]


def _child(argv: list[str], timeout_s: float) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                         timeout=timeout_s, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {out.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def verdict(results: dict, plain: dict, big: dict, mode: str | None) -> dict:
    """The named figures of ``mode``'s run (None: nothing measured) and whether each meets its
    target."""
    chosen = results.get(mode, {})
    svc = {c: lv["service"]["rps"] for c, lv in chosen.get("levels", {}).items()}
    bare = {c: lv["bare"]["rps"] for c, lv in chosen.get("levels", {}).items()}
    plain_rps = {c: lv["rps"] for c, lv in plain.get("levels", {}).items()}
    figures = {
        "mode": mode,
        "vs_bare_16": _ratio(svc.get("16"), bare.get("16")),
        "vs_bare_64": _ratio(svc.get("64"), bare.get("64")),
        "vs_plain_16": _ratio(svc.get("16"), plain_rps.get("16")),
        "vs_plain_64": _ratio(svc.get("64"), plain_rps.get("64")),
        "batch_10k_ms": chosen.get("batch_10k", {}).get("server_ms"),
        "load_10m_s": big.get("load_s"),
        "load_10m_rss_ratio": big.get("rss_ratio"),
        "image_p50_ms": chosen.get("image", {}).get("p50_ms"),
        "service_rps": svc, "bare_rps": bare, "plain_rps": plain_rps,
    }
    limits = {"vs_bare_16": (">=", 0.8), "vs_bare_64": (">=", 0.8), "vs_plain_16": (">=", 0.9),
              "vs_plain_64": (">=", 0.9), "batch_10k_ms": ("<", 50), "load_10m_s": ("<", 5),
              "load_10m_rss_ratio": ("<", 1.5), "image_p50_ms": ("<", 20)}
    figures["targets"] = {
        name: None if figures[name] is None else
        (figures[name] >= limit if op == ">=" else figures[name] < limit)
        for name, (op, limit) in limits.items()}
    return figures


def _print_table(results: dict, plain: dict, big: dict) -> None:
    print(f"{'server':20} {'clients':>7} {'bare rps':>9} {'svc rps':>8} {'ratio':>6} "
          f"{'svc p50':>8} {'svc p99':>8}")
    for mode, result in results.items():
        if "levels" not in result:
            print(f"{mode:20} failed: {result.get('error')}")
            continue
        for clients, level in result["levels"].items():
            s = level["service"]
            print(f"{mode:20} {clients:>7} {level['bare']['rps']:>9} {s['rps']:>8} "
                  f"{level['ratio']:>6} {s['p50_ms']:>8} {s['p99_ms']:>8}")
        print(f"{mode:20} batch of 10,000: {result['batch_10k']['server_ms']} ms server-side, "
              f"{result['batch_10k']['client_ms']} ms at the client; cached {IMAGE_SIDE}x"
              f"{IMAGE_SIDE} image p50 {result['image']['p50_ms']} ms")
    for clients, level in plain.get("levels", {}).items():
        print(f"{'plain uvicorn':20} {clients:>7} {'':>9} {level['rps']:>8} {'':>6} "
              f"{level['p50_ms']:>8} {level['p99_ms']:>8}")
    if "error" in plain:
        print(f"plain uvicorn failed: {plain['error']}")
    if big:
        print(f"10M-row table: {json.dumps(big)}")


def main() -> int:
    from raycurv.serve.launch import DEFAULT_INGRESS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=[DEFAULT_INGRESS],
                        help=f"Ray Serve ingress options to measure ({DEFAULT_INGRESS}, "
                             "raycurv serve's default; the first one gives the named figures)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (3)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the served table")
    parser.add_argument("--big-rows", type=int, default=10_000_000, help="0 skips the big load")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-big", help=argparse.SUPPRESS)
    parser.add_argument("--runs", help=argparse.SUPPRESS)
    parser.add_argument("--image-ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ids = [int(i) for i in args.image_ids.split(",")]
        print(json.dumps(child_mode(args.child, Path(args.runs), args.rows, args.seconds, ids)))
        return 0
    if args.child_plain:
        print(json.dumps(child_plain(Path(args.runs), args.rows, args.seconds)))
        return 0
    if args.child_big:
        print(json.dumps(child_big(Path(args.child_big))))
        return 0

    work = Path(tempfile.mkdtemp(prefix="raycurv-bench-"))
    runs, image_ids = write_runs(work, args.rows)
    common = ["--runs", str(runs), "--rows", str(args.rows), "--seconds", str(args.seconds)]
    started = time.monotonic()
    plain = _child(["--child-plain", *common], timeout_s=300)
    plain["wall_s"] = round(time.monotonic() - started, 1)
    print(f"plain uvicorn: {json.dumps(plain)}", file=sys.stderr, flush=True)
    results = {}
    for mode in args.modes:
        started = time.monotonic()
        results[mode] = _child(["--child", mode, *common,
                                "--image-ids", ",".join(map(str, image_ids))], timeout_s=300)
        results[mode]["wall_s"] = round(time.monotonic() - started, 1)
        print(f"{mode}: {json.dumps(results[mode])}", file=sys.stderr, flush=True)

    big = {}
    if args.big_rows:
        from raycurv.runfolder import RunFolder

        started = time.perf_counter()
        RunFolder(str(work / "big")).write_scores(synthetic_table(args.big_rows, run="big"))
        big = _child(["--child-big", str(work / "big")], timeout_s=300)
        big["write_s"] = round(time.perf_counter() - started, 1)

    _print_table(results, plain, big)
    measured = [m for m in args.modes if "levels" in results[m]]
    print(json.dumps(verdict(results, plain, big, measured[0] if measured else None),
                     separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
