"""`raycurv serve`: the lookup service (Ray Serve + FastAPI) over one or more run folders."""

from __future__ import annotations

import argparse
import sys

from raycurv import storage
from raycurv.commands._common import add_address, finite_float
from raycurv.errors import UsageError
from raycurv.serve.launch import DEFAULT_INGRESS, INGRESS_ENV
from raycurv.serve.settings import DEFAULT_RELOAD_INTERVAL_S, DEFAULT_REPLICA_CPUS, TOKEN_ENV


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `raycurv serve`."""
    parser.add_argument("--runs", nargs="+", action="extend", required=True, metavar="PATH",
                        help="run folder(s), folder(s) of runs, or score table file(s); paths or URIs")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the service listens on (127.0.0.1; 0.0.0.0: every "
                             "interface). Ray, its dashboard and HAProxy's stats and metrics "
                             "stay on 127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (8000)")
    parser.add_argument("--replicas", type=int, default=1, help="Serve replicas (1)")
    parser.add_argument("--replica-cpus", type=finite_float, default=DEFAULT_REPLICA_CPUS,
                        help=f"logical CPUs per replica ({DEFAULT_REPLICA_CPUS})")
    parser.add_argument("--token", default=None,
                        help=f"bearer token required on every route but /healthz "
                             f"(default: ${TOKEN_ENV}; none: open)")
    parser.add_argument("--reload-interval", type=finite_float, default=DEFAULT_RELOAD_INTERVAL_S,
                        metavar="SECONDS", help="seconds between checks for replaced tables (5)")
    parser.add_argument("--ingress", choices=sorted(INGRESS_ENV), default=DEFAULT_INGRESS,
                        help=f"Ray Serve ingress option for a local cluster ({DEFAULT_INGRESS}, "
                             "the fastest in bench/serve_load.py)")
    add_address(parser)


def run(args: argparse.Namespace) -> int:
    """Check the flags, start Ray and Serve, deploy, and serve until Ctrl-C."""
    from raycurv.serve.registry import discover
    from raycurv.serve.settings import build_settings

    try:
        missing = [p for p in args.runs if not storage.exists(p)]
    except OSError as exc:
        raise UsageError(f"cannot reach the run folders: {str(exc).splitlines()[0]}") from None
    if missing:
        raise UsageError(f"no such run folder or table: {', '.join(missing)}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    from raycurv.serve.launch import check_host, start_service, wait_forever

    loopback = check_host(args.host)
    settings = build_settings(runs=args.runs, reload_interval_s=args.reload_interval,
                              replicas=args.replicas, replica_cpus=args.replica_cpus,
                              token=args.token)
    if not loopback and not settings.token:
        print(f"raycurv serve: warning: listening on {args.host} with no token: whoever reaches "
              "this machine can read the scores (--token or $RAYCURV_SERVE_TOKEN)", file=sys.stderr)
    found = discover(settings.runs)
    if found:
        print(f"raycurv serve: {len(found)} run(s): {', '.join(sorted(found))}")
    else:
        print("raycurv serve: no score tables yet; runs are served as their tables appear")

    service = start_service(settings, host=args.host, port=args.port, address=args.address,
                            ingress=args.ingress)
    auth = "bearer token required" if settings.token else "no token (open)"
    print(f"raycurv serve: serving at {service.url} (ingress {args.ingress}, {settings.replicas} "
          f"replica(s), {auth}); browser UI at {service.url}/; Ctrl-C stops", flush=True)
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop cleanly under a process manager too
    signal.signal(signal.SIGINT, interrupt)  # even where the shell started us ignoring SIGINT
    try:
        wait_forever()
    except KeyboardInterrupt:
        service.stop()
        print("raycurv serve: stopped")
    return 0
