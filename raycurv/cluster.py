"""Joining Ray: an existing cluster (``address``) or a local one sized for the run.

A local cluster raycurv starts is this machine's alone and lives no longer than the raycurv
process that started it:

- its node address is 127.0.0.1, so Ray binds its servers (GCS, raylet and worker gRPC, the
  dashboard agent's and runtime-env agent's HTTP, metrics export) to loopback; the dashboard
  listens on 127.0.0.1 too;
- a watchdog process ends it when raycurv exits, however it exits (SIGKILL too): it stops every
  process that carries the cluster's mark in its environment or that raycurv named to it, then
  removes raycurv's folders for the cluster. Ray alone fate-shares only the driver's direct
  children (GCS, raylet, dashboard); in Ray 2.60 the dashboard agent and runtime-env agent log
  that their raylet died and keep running, and HAProxy outlives its Serve actor, so after a
  SIGKILL they would stay behind, still listening.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence

from raycurv.errors import UsageError

LOOPBACK = "127.0.0.1"
# Ray's "local Ray only" switch (ray/_private/ray_constants.py, ENABLE_RAY_CLUSTER): when "0",
# services.get_node_ip_address() answers 127.0.0.1, so a new node's servers bind to loopback.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Set to a fresh id in the environment of each local cluster raycurv starts; every process of the
# cluster inherits it (GCS, raylet, agents, workers, HAProxy and whatever they start).
CLUSTER_MARK_ENV = "RAYCURV_CLUSTER"
# The GCS port of a cluster Ray starts (ray/_private/node.py). raycurv chooses it, so that the
# cluster's processes get its address as RAY_ADDRESS: Ray Train's PlacementGroupCleaner looks
# its cluster up by address, and without one fails with a traceback ("Found multiple active Ray
# instances") whenever another cluster runs on the machine.
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
STOP_GRACE_S = 2.0  # SIGTERM, then SIGKILL for what is still running after this long

_watchdogs: list[subprocess.Popen] = []  # held for the process's life: their stdin is the signal


def ensure_ray(address: str | None = None, *, cpus_needed: float = 1.0,
               cleanup: Sequence[str] = ()) -> None:
    """Connect to ``address``, or start a local cluster with at least ``cpus_needed`` logical CPUs.

    A process that already joined Ray (a test session, a notebook) keeps its connection.
    ``cleanup``: folders to remove once a local cluster has ended.
    """
    import ray

    if ray.is_initialized():
        return
    address = joined_address(address)
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as exc:  # ConnectionError, RuntimeError, ... depending on the failure
            raise UsageError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
        return
    # Logical CPUs: on a small machine the training workers and actors share the cores.
    start_local_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), cleanup=cleanup)


def joined_address(address: str | None) -> str | None:
    """The cluster ensure_ray joins: ``address``, else $RAY_ADDRESS (set inside a Ray job), else
    None (a local cluster)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def start_local_ray(*, num_cpus: int, cleanup: Sequence[str] = ()) -> None:
    """Start a local cluster on loopback that ends with this process; ``cleanup``: folders the
    watchdog removes after it."""
    import ray

    loopback_node()
    start_watchdog(cleanup)
    gcs_port = _free_port()
    os.environ[GCS_PORT_ENV] = str(gcs_port)
    try:  # its processes are told its address: see the note at GCS_PORT_ENV
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK, log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"{LOOPBACK}:{gcs_port}"}})
    finally:
        os.environ.pop(GCS_PORT_ENV, None)
    record_cluster_processes()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def loopback_node() -> None:
    """Make the next node this process starts use 127.0.0.1 as its address.

    Ray reads the switch when it is imported; its own processes import it fresh with the variable
    set, and this process, which may have imported Ray already, gets the value set where Ray keeps
    it. (``ray.init(_node_ip_address="127.0.0.1")`` is no substitute: Ray swaps a loopback address
    for the machine's own when clusters are enabled.)"""
    from ray._private import ray_constants

    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def start_watchdog(cleanup: Sequence[str] = ()) -> None:
    """Mark the cluster about to start and start its watchdog.

    The watchdog reads its stdin, a pipe only this process writes to, so it sees end-of-file the
    moment this process is gone, SIGKILL included. It runs in a session of its own: Ctrl-C in the
    terminal reaches raycurv (which stops cleanly) but not the watchdog."""
    mark = uuid.uuid4().hex
    os.environ[CLUSTER_MARK_ENV] = mark  # before ray.init: Ray's processes inherit this environment
    _watchdogs.append(subprocess.Popen(
        [sys.executable, "-c", "from raycurv.cluster import watch; watch()", mark, *cleanup],
        stdin=subprocess.PIPE, start_new_session=True,
        # not the caller's stdout/stderr: a pipe held open by the watchdog would keep whoever
        # reads raycurv's output waiting past raycurv's exit
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def record_cluster_processes() -> None:
    """Name to the watchdog the processes started under this one since the watchdog (pid and
    start time): the cluster's, not older children of this process.

    The mark alone does not find them all: Ray's Python processes (agents, workers) write their
    title ("ray::DashboardAgent") over the memory that /proc shows as their environment."""
    if not _watchdogs:
        return
    tree = descendants(os.getpid())
    since = int(tree.get(_watchdogs[-1].pid, 0))
    lines = "".join(f"{pid} {started}\n" for pid, started in tree.items() if int(started) >= since)
    with contextlib.suppress(OSError):  # a watchdog that is gone cannot be told
        _watchdogs[-1].stdin.write(lines.encode())
        _watchdogs[-1].stdin.flush()


def watch() -> None:
    """The watchdog (``python -c``; argv: the mark, then folders to remove): note the processes
    raycurv names until it is gone, then stop every process of its cluster and remove the folders."""
    mark, *cleanup = sys.argv[1:]
    named = {}
    for line in sys.stdin:  # ends at end-of-file: raycurv exited or was killed
        pid, started = line.split()
        named[int(pid)] = started
    stop_cluster(mark, named)
    for path in cleanup:
        shutil.rmtree(path, ignore_errors=True)


def stop_cluster(mark: str, named: dict[int, str], *, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the cluster's processes, SIGKILL those still running after ``grace_s``.

    Looks again every round: a raylet that is still alive may start a process meanwhile."""
    deadline = time.monotonic() + grace_s
    while pids := cluster_processes(mark, named):
        _signal_all(pids, signal.SIGKILL if time.monotonic() > deadline else signal.SIGTERM)
        if time.monotonic() > deadline + grace_s:  # unkillable (uninterruptible I/O): give up
            return
        time.sleep(0.2)


def cluster_processes(mark: str, named: dict[int, str]) -> list[int]:
    """Live processes (zombies are done) that carry ``mark`` or were ``named`` (pid -> start
    time, so a reused pid is not taken for the process that had it)."""
    needle = f"{CLUSTER_MARK_ENV}={mark}".encode()
    found = []
    for pid, (state, _, started) in _proc_table().items():
        if state == "Z" or pid == os.getpid():
            continue
        if named.get(pid) == started:
            found.append(pid)
            continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
            if needle in f.read().split(b"\0"):
                found.append(pid)
    return found


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every process under ``root``."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][2]
        todo.extend(children.get(pid, []))
    return found


def _proc_table() -> dict[int, tuple[str, int, str]]:
    """pid -> (state, parent pid, start time in clock ticks) from Linux's /proc; empty elsewhere."""
    table = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    with open(f"/proc/{entry.name}/stat") as f:
                        fields = f.read().rpartition(")")[2].split()  # the name may hold spaces
                    table[int(entry.name)] = (fields[0], int(fields[1]), fields[19])
    return table


def _signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def check_resources(*, cpus: float, gpus: float) -> None:
    """Refuse a run the cluster can never schedule (it would wait forever)."""
    import ray

    total = ray.cluster_resources()
    if cpus > total.get("CPU", 0) + 1e-9 or gpus > total.get("GPU", 0) + 1e-9:
        raise UsageError(f"the run needs {cpus:g} CPUs and {gpus:g} GPUs; the cluster has "
                         f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs")


def outside_placement_groups():
    """A scheduling strategy that places a task or actor on the cluster itself, not inside the
    caller's placement group (a Tune trial's), whose bundles hold the trial's workers only."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=None)
