"""Joining Ray: an existing cluster (``address``) or a local one sized for the run."""

from __future__ import annotations

import math
import os

from raycurv.errors import UsageError


def ensure_ray(address: str | None = None, *, cpus_needed: float = 1.0) -> None:
    """Connect to ``address``, or start a local cluster with at least ``cpus_needed`` logical CPUs.

    A process that already joined Ray (a test session, a notebook) keeps its connection.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "log_to_driver": True}
    address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray job
    if address:
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # ConnectionError, RuntimeError, ... depending on the failure
            raise UsageError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
        return
    # Logical CPUs: on a small machine the training workers and actors share the cores.
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), **kwargs)


def check_resources(*, cpus: float, gpus: float) -> None:
    """Refuse a run the cluster can never schedule (it would wait forever)."""
    import ray

    total = ray.cluster_resources()
    if cpus > total.get("CPU", 0) + 1e-9 or gpus > total.get("GPU", 0) + 1e-9:
        raise UsageError(f"the run needs {cpus:g} CPUs and {gpus:g} GPUs; the cluster has "
                         f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs")
