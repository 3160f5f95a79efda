"""Load benchmark of the lookup service against a bare Ray Serve deployment, side by side.

For each Ray Serve ingress option (plain proxy, RAY_SERVE_THROUGHPUT_OPTIMIZED=1, the HAProxy
ingress RAY_SERVE_ENABLE_HA_PROXY=1, and both), a fresh local Ray cluster runs two applications:
the lookup service over a synthetic table, and a bare deployment that returns a constant. Each
is loaded with single-sample GETs at 1, 16 and 64 concurrent keep-alive clients (loopback only,
bounded in time and count); then 10,000-id batch lookups are timed (Server-Timing header). A
10-million-row table is loaded in a separate process for load time and resident memory.

Targets: service >= 0.8x bare throughput; batch of 10,000 < 50 ms server-side; 10M rows load
< 5 s with resident memory < 1.5x the table's Arrow size. Prints a table, then ONE line of JSON.

    python bench/serve_load.py [--modes proxy haproxy] [--seconds 3] [--big-rows 10000000]
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


# --- one ingress option, in a child process with its own Ray cluster ------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_http(port: int, path: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                sock.sendall(_request("GET", path) + b"")
                if b" 200 " in sock.recv(200):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{path} on port {port} not ready after {timeout_s}s")


def child_mode(mode: str, runs: Path, rows: int, seconds: float) -> dict:
    """Measure one ingress option: bare vs service at each concurrency, and the 10k batch."""
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
        rng = random.Random(0)
        sample_paths = [f"/v1/runs/bench/samples/{rng.randrange(rows)}" for _ in range(4096)]
        result: dict = {"mode": mode, "port": port, "levels": {}}
        for clients in CONCURRENCY:
            bare = load(port, ["/bare"], clients=clients, seconds=seconds)
            service = load(port, sample_paths, clients=clients, seconds=seconds)
            result["levels"][str(clients)] = {
                "bare": bare, "service": service,
                "ratio": round(service["rps"] / bare["rps"], 3) if bare["rps"] else None,
            }
        ids = [rng.randrange(rows) for _ in range(10_000)]
        result["batch_10k"] = batch_timing(port, "/v1/runs/bench/samples:lookup", ids)
        return result
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def child_big(path: Path) -> dict:
    """Load a big table into a TableIndex: seconds, and resident memory against Arrow size."""
    import numpy as np

    from raycurv.serve.index import TableIndex

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    started = time.perf_counter()
    index = TableIndex.load(path)
    load_s = time.perf_counter() - started
    resident = rss() - before
    started = time.perf_counter()
    np.unique(np.arange(index.rows))  # what raycurv.table.validate_table's uniqueness check costs
    unique_s = time.perf_counter() - started
    return {"rows": index.rows, "load_s": round(load_s, 2),
            "index_build_s": round(index.load_seconds, 2),
            "validate_unique_s": round(unique_s, 2),
            "arrow_mb": round(index.arrow_bytes / 1e6, 1), "rss_mb": round(resident / 1e6, 1),
            "rss_ratio": round(resident / index.arrow_bytes, 3)}


# --- the parent: tables, children, the verdict ----------------------------------------------

def synthetic_table(rows: int, *, seed: int = 0, run: str = "bench"):
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


def _child(argv: list[str], timeout_s: float) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                         timeout=timeout_s, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {out.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def _geomean(values) -> float:
    values = [max(v, 1e-9) for v in values]
    product = 1.0
    for v in values:
        product *= v
    return product ** (1 / len(values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (3)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the served table")
    parser.add_argument("--big-rows", type=int, default=10_000_000, help="0 skips the big load")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-big", help=argparse.SUPPRESS)
    parser.add_argument("--runs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_mode(args.child, Path(args.runs), args.rows, args.seconds)))
        return 0
    if args.child_big:
        print(json.dumps(child_big(Path(args.child_big))))
        return 0

    from raycurv.runfolder import RunFolder

    work = Path(tempfile.mkdtemp(prefix="raycurv-bench-"))
    RunFolder(str(work / "runs" / "bench")).write_scores(synthetic_table(args.rows))
    results = {}
    for mode in args.modes:
        started = time.monotonic()
        results[mode] = _child(["--child", mode, "--runs", str(work / "runs"), "--rows",
                                str(args.rows), "--seconds", str(args.seconds)], timeout_s=300)
        results[mode]["wall_s"] = round(time.monotonic() - started, 1)
        print(f"{mode}: {json.dumps(results[mode])}", file=sys.stderr, flush=True)

    big = {}
    if args.big_rows:
        started = time.perf_counter()
        RunFolder(str(work / "big")).write_scores(synthetic_table(args.big_rows, run="big"))
        big = _child(["--child-big", str(work / "big")], timeout_s=300)
        big["write_s"] = round(time.perf_counter() - started, 1)

    ok = {m: r for m, r in results.items() if "levels" in r}
    # the winner: highest geometric mean of the service's throughput over 1, 16 and 64 clients
    winner = max(ok, key=lambda m: _geomean(lv["service"]["rps"] for lv in ok[m]["levels"].values())
                 ) if ok else None
    print(f"{'mode':20} {'clients':>7} {'bare rps':>9} {'svc rps':>8} {'ratio':>6} "
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
              f"{result['batch_10k']['client_ms']} ms at the client")
    if big:
        print(f"10M-row table: {json.dumps(big)}")
    summary = {
        "winner": winner,
        "modes": {m: {"ratio": {c: lv["ratio"] for c, lv in r["levels"].items()},
                      "service_rps": {c: lv["service"]["rps"] for c, lv in r["levels"].items()},
                      "bare_rps": {c: lv["bare"]["rps"] for c, lv in r["levels"].items()},
                      "service_p50_ms": {c: lv["service"]["p50_ms"] for c, lv in r["levels"].items()},
                      "service_p99_ms": {c: lv["service"]["p99_ms"] for c, lv in r["levels"].items()},
                      "errors": sum(lv["service"]["errors"] + lv["bare"]["errors"]
                                    for lv in r["levels"].values()),
                      "batch_10k_server_ms": r["batch_10k"]["server_ms"]}
                  if "levels" in r else {"error": r.get("error")}
                  for m, r in results.items()},
        "big_table": big,
    }
    if winner:
        w = ok[winner]
        summary["targets"] = {
            "ratio_ge_0.8": all(lv["ratio"] >= 0.8 for lv in w["levels"].values()),
            "batch_10k_lt_50ms": w["batch_10k"]["server_ms"] < 50,
            "big_load_lt_5s": bool(big) and big.get("load_s", 1e9) < 5,
            "big_rss_lt_1.5x": bool(big) and big.get("rss_ratio", 1e9) < 1.5,
        }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
