"""The Ray Serve application: one deployment whose replicas each hold the index of every run.

``build_app(settings)`` is used by ``raycurv serve``; ``app_builder`` is the typed application
builder behind ``serve run deploy/serve.yaml``.
"""

import logging

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from raycurv.serve.api import build_api
from raycurv.serve.prometheus import build_metrics
from raycurv.serve.registry import RunRegistry
from raycurv.serve.settings import ServeSettings, with_env_token

DEPLOYMENT_NAME = "MemorizationLookup"
APP_NAME = "raycurv"


@serve.ingress()
class MemorizationLookup:
    """A replica: loads every run's table at start, then serves the FastAPI routes and re-checks
    the run folders every ``reload_interval_s``. Higher curvature = more memorized."""

    def __init__(self, settings: ServeSettings) -> None:
        self._settings = settings
        self._log = logging.getLogger("ray.serve")
        self._metrics = build_metrics(export_to_ray=True)
        self._registry = RunRegistry(sources=settings.runs, metrics=self._metrics, log=self._log)
        for change in self._registry.refresh():
            self._log.info("startup: %s", change)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The ASGI app, built after the tables are loaded (Serve calls this at replica start)."""
        return build_api(registry=self._registry, settings=self._settings, metrics=self._metrics,
                         log=self._log)


def build_app(settings: ServeSettings) -> Application:
    """The lookup application for ``settings`` (replicas, CPUs per replica, runs, token)."""
    deployment = serve.deployment(
        MemorizationLookup,
        name=DEPLOYMENT_NAME,
        num_replicas=settings.replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.replica_cpus},
    )
    return deployment.bind(settings)


def app_builder(args: ServeSettings) -> Application:
    """Typed builder for ``serve run deploy/serve.yaml``: Serve validates the YAML ``args`` into
    ServeSettings; the token may instead come from $RAYCURV_SERVE_TOKEN."""
    settings = args if isinstance(args, ServeSettings) else ServeSettings.model_validate(args)
    return build_app(with_env_token(settings))
