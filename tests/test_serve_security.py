"""What the lookup service exposes and leaves behind: listening addresses, HAProxy's admin socket,
the request-body limit whatever the transfer encoding, and the cluster's processes after a stop
or a SIGKILL. Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from raycurv.cli import main
from raycurv.cluster import CLUSTER_MARK_ENV, descendants, record_cluster_processes
from raycurv.serve.api import MAX_BODY_BYTES, build_api
from raycurv.serve.launch import SERVICE_SECTIONS, confine_haproxy
from raycurv.serve.prometheus import build_metrics
from raycurv.serve.registry import RunRegistry
from raycurv.serve.settings import build_settings
from tests.serve_support import (
    free_port,
    is_loopback,
    listening_sockets,
    make_table,
    process_title,
    running,
    wait_until,
    write_run,
)

LOOKUP = "/v1/runs/alpha/samples:lookup"
# The one Ray server a local `raycurv serve` leaves on every interface: each Serve replica's
# inter-deployment gRPC server (ray/serve/_private/replica.py binds "[::]:0"; Ray 2.60 has no
# setting for it). Ray's token authentication guards it (checked below).
NON_LOOPBACK_TITLES = ("ray::ServeReplica:raycurv:MemorizationLookup",)
SIGKILL_CLEANUP_S = 20.0  # measured: every process gone about 2.5-5.5 s after the SIGKILL


# --- the body limit, at the ASGI level ----------------------------------------------------------

@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The FastAPI app over one small run, without Ray."""
    root = tmp_path_factory.mktemp("runs")
    write_run(root, "alpha", make_table(40, run="alpha"))
    settings = build_settings(runs=[root], environ={})
    metrics = build_metrics()
    registry = RunRegistry(sources=settings.runs, metrics=metrics)
    registry.refresh()
    return build_api(registry=registry, settings=settings, metrics=metrics, reload=False)


@dataclass
class Body:
    """A chunked JSON lookup body of ``chunks`` x ``chunk_bytes`` that counts what was read."""

    chunks: int
    chunk_bytes: int = 64 * 1024
    read: int = 0

    async def __aiter__(self):
        yield b'{"sample_ids": ['
        for _ in range(self.chunks):
            self.read += self.chunk_bytes
            yield b"1," * (self.chunk_bytes // 2)
        yield b"1]}"


def _post(app, body, headers=None) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post(LOOKUP, content=body,
                                     headers={"Content-Type": "application/json", **(headers or {})})

    return asyncio.run(send())


def test_chunked_body_over_the_limit_is_413_and_reading_stops(app):
    body = Body(chunks=800)  # 50 MiB, sent without Content-Length
    r = _post(app, body)
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in r.request.headers
    assert r.status_code == 413
    assert r.json() == {"detail": f"request body exceeds the limit of {MAX_BODY_BYTES} bytes"}
    assert body.read <= MAX_BODY_BYTES + body.chunk_bytes  # stopped at the first chunk past it


def test_chunked_body_under_the_limit_is_answered(app):
    body = Body(chunks=3, chunk_bytes=8)
    r = _post(app, body)
    assert r.status_code == 200, r.text
    assert [row["sample_id"] for row in r.json()["rows"]] == [1] * 13
    assert body.read == 3 * 8


def test_declared_oversized_body_is_refused_unread(app):
    body = Body(chunks=800)
    r = _post(app, body, headers={"Content-Length": str(50 * 2**20)})
    assert r.status_code == 413
    assert body.read == 0


# --- HAProxy's config, as Ray Serve renders it ---------------------------------------------------

def _render_serve_haproxy_config(folder: Path, host: str) -> str:
    """The config Ray Serve's own template renders for a service on ``host``."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    api = HAProxyApi(cfg=HAProxyConfig(socket_path=str(folder / "admin.sock"),
                                       server_state_base=str(folder),
                                       server_state_file=str(folder / "server-state"),
                                       http_options=HTTPOptions(host=host, port=8123)),
                     config_file_path=str(folder / "haproxy.cfg"))
    api._generate_config_file_internal()
    return (folder / "haproxy.cfg").read_text()


def _binds(config: str) -> dict[str, list[str]]:
    """section -> the addresses its ``bind`` lines listen on."""
    found, section = {}, ""
    for line in config.splitlines():
        if line[:1].strip():
            section = line.strip()
        if line.split()[:1] == ["bind"]:
            found.setdefault(section, []).append(line.split()[1])
    return found


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_confined_config_keeps_only_the_service_off_loopback(tmp_path, host):
    rendered = _render_serve_haproxy_config(tmp_path, host)
    before, after = _binds(rendered), _binds(confine_haproxy(rendered))
    assert before["listen stats"] == ["*:8404"] and before["frontend prometheus"] == [":9101"]
    assert after["listen stats"] == ["127.0.0.1:8404"]
    assert after["frontend prometheus"] == ["127.0.0.1:9101"]
    service = "*:8123" if host == "0.0.0.0" else "127.0.0.1:8123"
    assert after["frontend http_frontend"] == before["frontend http_frontend"] == [service]
    assert set(after) - SERVICE_SECTIONS == {"listen stats", "frontend prometheus"}
    socket_line = next(line for line in confine_haproxy(rendered).splitlines()
                       if line.split()[:2] == ["stats", "socket"])
    assert " mode 600 " in socket_line and "666" not in socket_line


# --- user errors -----------------------------------------------------------------------------------

def test_host_not_on_this_machine_is_one_line(tmp_path, capsys):
    write_run(tmp_path, "alpha", make_table(10, run="alpha"))
    # TEST-NET-3 (RFC 5737): bind() refuses it locally; nothing is sent anywhere
    assert main(["serve", "--runs", str(tmp_path), "--host", "203.0.113.7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "raycurv serve: error: --host '203.0.113.7': not an address of this machine"


# --- the watchdog, without Ray ---------------------------------------------------------------------

WATCHED = """
import os, subprocess, sys, time
from raycurv.cluster import CLUSTER_MARK_ENV, record_cluster_processes, start_watchdog
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
older = subprocess.Popen(sleep)  # a child from before the cluster: not the cluster's
time.sleep(0.05)  # start times count clock ticks (10 ms)
start_watchdog([sys.argv[1]])
marked = subprocess.Popen(sleep)  # inherits the mark, like every process Ray starts
hidden = dict(os.environ)
hidden.pop(CLUSTER_MARK_ENV)  # like a Ray process whose title overwrote its environment
named = subprocess.Popen(sleep, env=hidden)
record_cluster_processes()
print(marked.pid, named.pid, older.pid, flush=True)
time.sleep(600)
"""


def test_watchdog_stops_marked_and_named_processes_after_sigkill(tmp_path):
    folder = tmp_path / "private"
    folder.mkdir()
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    env = {k: v for k, v in os.environ.items() if k != CLUSTER_MARK_ENV}
    parent = subprocess.Popen([sys.executable, "-c", WATCHED, str(folder)], env=env,
                              stdout=subprocess.PIPE, text=True)
    *cluster, older = [int(pid) for pid in parent.stdout.readline().split()]
    try:
        assert len(cluster) == 2 and all(running(pid) for pid in [*cluster, older])
        parent.kill()
        parent.wait()
        wait_until(lambda: not any(running(pid) for pid in cluster), timeout_s=10)
        wait_until(lambda: not folder.exists(), timeout_s=10)
        # neither marked nor named: not the cluster's
        assert running(outsider.pid) and running(older)
    finally:
        outsider.kill()
        outsider.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(older, signal.SIGKILL)


def test_record_without_a_watchdog_is_a_no_op():
    record_cluster_processes()  # this test process started no local cluster


# --- a real `raycurv serve` (default ingress, its own local cluster) ------------------------------

@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    stats_port: int
    metrics_port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def served(tmp_path):
    """`raycurv serve` over one small run in a subprocess, ready; killed if a test left it up."""
    write_run(tmp_path / "runs", "alpha", make_table(40, run="alpha"))
    port, stats_port, metrics_port, fallback_port = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if k not in (CLUSTER_MARK_ENV, "RAY_ADDRESS")}
    env.update({
        # HAProxy's stats and metrics ports and Serve's fallback proxy are fixed by default;
        # free ones keep this test clear of any other service on the machine
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_port),
        # a replica waits this long for HAProxy to drain it (30 s by default): a fast stop
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    })
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raycurv.cli", "serve", "--runs",
                                 str(tmp_path / "runs"), "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    service = Served(proc, port, stats_port, metrics_port, log)
    try:
        wait_until(lambda: "serving at" in service.output() or proc.poll() is not None,
                   timeout_s=180, every_s=0.5)
        assert proc.poll() is None, service.output()
        yield service
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _tree(service: Served) -> dict[int, str]:
    """pid -> start time of the service's processes (Ray, Serve, HAProxy, the watchdog)."""
    tree = descendants(service.proc.pid)
    assert any(title.startswith("ray::DashboardAgent") for title in map(process_title, tree))
    return tree


def _haproxy_folder(tree) -> Path:
    """The folder of HAProxy's files: the config its command line names with -f is in it."""
    for pid in tree:
        args = process_title(pid).split()
        if _is_haproxy(args):
            return Path(args[args.index("-f") + 1]).parent
    raise AssertionError("no HAProxy process in the service's process tree")


def _is_haproxy(args: list[str]) -> bool:
    return bool(args) and Path(args[0]).name == "haproxy" and "-f" in args


def _chunked_post_status(port: int, total: int) -> tuple[int, int]:
    """POST a chunked body of ``total`` bytes to the lookup route, stopping once the server has
    answered or closed; returns (status, bytes of body sent)."""
    chunk = b"1," * 32768
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST {LOOKUP} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                     "\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n".encode() + b'{"sample_ids": [\r\n')
        sock.setblocking(False)
        sent, pending = 0, frame
        while sent < total and not _answered(sock):
            try:
                pending = pending[sock.send(pending):]
            except BlockingIOError:
                time.sleep(0.01)  # the buffers are full
            except OSError:
                break  # the server closed the connection
            if not pending:
                sent, pending = sent + len(chunk), frame
        sock.setblocking(True)
        return int(sock.recv(64).split()[1]), sent


def _answered(sock: socket.socket) -> bool:
    """Whether the server has sent something (or closed) on the non-blocking ``sock``."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    return True


@pytest.mark.slow
def test_serve_listens_on_loopback_and_cleans_up_on_sigterm(served):
    tree = _tree(served)
    listening = listening_sockets(tree)
    outside = sorted((address, port, process_title(pid)) for address, port, pid in listening
                     if not is_loopback(address))
    assert [title for _, _, title in outside] == list(NON_LOOPBACK_TITLES), outside
    haproxy = {port for _, port, pid in listening if _is_haproxy(process_title(pid).split())}
    assert {served.port, served.stats_port, served.metrics_port} <= haproxy, listening
    assert any("dashboard/dashboard.py" in process_title(pid) for _, _, pid in listening)

    # the replica's gRPC port wants Ray's token
    with grpc.insecure_channel(f"127.0.0.1:{outside[0][1]}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest",
                                   request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    folder = _haproxy_folder(tree)  # <private>/<node id>/
    sock = folder / "admin.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700

    # a chunked body over the limit, through HAProxy: 413 long before 50 MiB are sent
    # (without the limit the whole body is read and parsed: 422 for the unclosed JSON; how much
    # of it the client got into HAProxy's and the kernel's buffers first depends on the load)
    status, sent = _chunked_post_status(served.port, 50 * 2**20)
    assert status == 413, (status, sent)
    ok = httpx.post(f"http://127.0.0.1:{served.port}{LOOKUP}", json={"sample_ids": [1]}, timeout=30)
    assert ok.status_code == 200 and json.loads(ok.text)["rows"][0]["sample_id"] == 1

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=120) == 0, served.output()
    assert "raycurv serve: stopped" in served.output()
    assert not folder.parent.exists()
    wait_until(lambda: not any(running(pid, started) for pid, started in tree.items()),
               timeout_s=SIGKILL_CLEANUP_S)


@pytest.mark.slow
def test_sigkilled_serve_leaves_no_process_and_no_socket_folder(served):
    tree = _tree(served)
    folder = _haproxy_folder(tree).parent
    served.proc.kill()
    served.proc.wait()
    killed = time.monotonic()
    wait_until(lambda: not [process_title(pid) for pid, started in tree.items()
                            if running(pid, started)], timeout_s=SIGKILL_CLEANUP_S)
    print(f"cluster gone {time.monotonic() - killed:.1f} s after the SIGKILL")
    assert not folder.exists()
