"""Settings of the lookup service: what to serve and how; built by a function, never at import."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, SecretStr

TOKEN_ENV = "RAYCURV_SERVE_TOKEN"
DEFAULT_RELOAD_INTERVAL_S = 5.0
DEFAULT_REPLICA_CPUS = 0.25


class ServeSettings(BaseModel):
    """Typed arguments of the Serve application (also the args of deploy/serve.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runs: list[str] = Field(
        min_length=1,
        description="run folders (holding a score table), folders of run folders, or table files",
    )
    reload_interval_s: float = Field(
        DEFAULT_RELOAD_INTERVAL_S, gt=0, le=3600,
        description="seconds between checks of the run folders for new or replaced tables")
    replicas: int = Field(1, ge=1, le=64, description="Serve replicas of the lookup deployment")
    replica_cpus: float = Field(DEFAULT_REPLICA_CPUS, gt=0, le=64,
                                description="logical CPUs reserved by each replica")
    max_ongoing_requests: int = Field(128, ge=1, le=10_000,
                                      description="concurrent requests one replica accepts")
    token: SecretStr | None = Field(
        None, description=f"bearer token every route but /healthz requires (or ${TOKEN_ENV})")


def build_settings(
    *,
    runs: Sequence[str | os.PathLike],
    reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S,
    replicas: int = 1,
    replica_cpus: float = DEFAULT_REPLICA_CPUS,
    max_ongoing_requests: int = 128,
    token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServeSettings:
    """Settings from explicit values; the token falls back to $RAYCURV_SERVE_TOKEN.

    Raises pydantic.ValidationError for out-of-range values."""
    return ServeSettings(
        runs=[os.fspath(r) for r in runs],
        reload_interval_s=reload_interval_s,
        replicas=replicas,
        replica_cpus=replica_cpus,
        max_ongoing_requests=max_ongoing_requests,
        token=token or env_token(environ),
    )


def env_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token in $RAYCURV_SERVE_TOKEN (the service's and its clients' one place to
    read it), or None when unset or empty."""
    return (os.environ if environ is None else environ).get(TOKEN_ENV) or None


def with_env_token(settings: ServeSettings, *, environ: Mapping[str, str] | None = None
                   ) -> ServeSettings:
    """``settings`` with the token taken from $RAYCURV_SERVE_TOKEN when it names none."""
    token = env_token(environ)
    if settings.token is not None or token is None:
        return settings
    return settings.model_copy(update={"token": SecretStr(token)})
