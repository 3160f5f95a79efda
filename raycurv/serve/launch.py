"""Start the lookup service on Ray Serve: the ingress choice, Ray, Serve's HTTP options.

Ray Serve reads its ingress options from environment variables when its processes start, so for
a local cluster they are set before ``ray.init``; a cluster given by ``--address`` uses whatever
its nodes were started with. Which ingress is the default is decided by bench/serve_load.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from raycurv.serve.settings import ServeSettings

# name -> Ray Serve environment; measured side by side in bench/serve_load.py
INGRESS_ENV: dict[str, dict[str, str]] = {
    "proxy": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "haproxy-throughput": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
DEFAULT_INGRESS = "haproxy-throughput"  # won bench/serve_load.py (see README)


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


def start_service(settings: ServeSettings, *, host: str, port: int, address: str | None,
                  ingress: str, app_name: str = "raycurv",
                  ray_init_kwargs: Mapping[str, object] | None = None) -> str:
    """Start (or join) Ray, start Serve on ``host:port`` and deploy the lookup application.

    Returns the service URL. Must run before anything else in the process starts Ray."""
    import ray
    from ray import serve

    from raycurv.serve.app import build_app

    if address is None:
        apply_ingress_env(ingress)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=True, dashboard_host="127.0.0.1",
                 **dict(ray_init_kwargs or {}))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=app_name, route_prefix="/")
    return f"http://{host}:{port}"


def wait_forever(poll_s: float = 3600.0) -> None:
    """Block until interrupted (Ctrl-C)."""
    while True:
        time.sleep(poll_s)
