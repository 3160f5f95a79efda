"""The FastAPI application of the lookup API (contract v1), independent of Ray Serve.

Routes answer from the registry's current snapshot; a background task re-checks the run folders
every ``reload_interval_s``, another hands the metrics to Ray every second. The routes that show a
sample beyond its row (image, per-epoch curve, duplicates) are in raycurv.serve.extra_routes, the
browser UI's files in raycurv.serve.ui. Client mistakes get a one-line ``detail`` and a 4xx: 401 without the
bearer token, 404 for an unknown run or sample (naming what exists), 413 for an oversized body,
422 for malformed input (naming the limit when a batch is too large). Never a 500 for input.

Scores: higher curvature = more memorized; rank 1 = highest curvature.
"""


import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from raycurv import __version__
from raycurv.serve import payloads
from raycurv.serve.extra_routes import build_extra_routes
from raycurv.serve.extras import Extras, Unavailable
from raycurv.serve.prometheus import CONTENT_TYPE, ServeMetrics
from raycurv.serve.registry import RunRegistry
from raycurv.serve.routing import INVALID, NOT_FOUND, SampleIdPath, json_response
from raycurv.serve.schemas import (
    MAX_BATCH,
    MAX_K,
    ErrorResponse,
    HealthResponse,
    LookupRequest,
    LookupResponse,
    RunsResponse,
    SampleResponse,
    SummaryResponse,
    TopResponse,
)
from raycurv.serve.settings import ServeSettings
from raycurv.serve.ui import PUBLIC_PATHS, build_ui_routes

MAX_BODY_BYTES = 1 << 20  # a full batch of 10,000 int64 ids is < 200 KiB of JSON
INT32_MAX = 2**31 - 1
MAX_OFFSET = 2**53 - 1
METRICS_FLUSH_S = 1.0

ROUTE_SAMPLE = "/v1/runs/{run}/samples/{sample_id}"
ROUTE_LOOKUP = "/v1/runs/{run}/samples:lookup"
ROUTE_TOP = "/v1/runs/{run}/top"

DESCRIPTION = """Per-sample memorization scores of raycurv runs.

Higher `curvature` = more memorized; `rank` 1 = the highest curvature; `percentile` = share of
samples with strictly lower curvature. Tables are reloaded when their file is replaced."""


def _error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": " ".join(detail.split())}, status_code=status_code,
                        headers=headers)


def _unauthorized(reason: str) -> JSONResponse:
    return _error(401, f"{reason} bearer token (send Authorization: Bearer <token>)",
                  headers={"WWW-Authenticate": "Bearer"})


class BodyTooLarge(StarletteHTTPException):
    """A request body passed MAX_BODY_BYTES while it was being read.

    Raised from inside ``receive``, so it surfaces where the app reads the body; FastAPI re-raises
    HTTP exceptions met while reading a body (anything else becomes a 400), and the app's handler
    answers the 413 before any byte is parsed."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def limit_body(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    """``receive`` that counts the body bytes it hands on and raises BodyTooLarge once they pass
    ``limit``. Content-Length alone cannot bound a body: a chunked request has none, so the count
    is the only limit that holds whatever the transfer encoding."""
    received = 0

    async def receive_limited() -> dict:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_limited


class ObserveMiddleware:
    """In front of every route: checks the bearer token (all routes but /healthz and the UI's
    files, which hold no scores), refuses
    oversized bodies (413: at once when Content-Length says so, else as soon as the bytes read
    pass the limit), counts requests by route template and status, times them, and adds
    a Server-Timing header (time inside the app until the response starts). Requests refused
    before routing are counted under the route "unmatched"."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, metrics: ServeMetrics,
                 token: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.expected = token.encode() if token else None

    def _refusal(self, scope: dict) -> Response | None:
        """A 401 or 413 answer for a request that must not reach the routes, else None."""
        headers = dict(scope.get("headers") or [])
        if self.expected is not None:
            path = scope.get("path", "")
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            if path != "/healthz" and path not in PUBLIC_PATHS:
                given = headers.get(b"authorization", b"")
                scheme, _, credentials = given.partition(b" ")
                if not given:
                    return _unauthorized("missing")
                if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(),
                                                                          self.expected):
                    return _unauthorized("wrong")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(413, f"request body of {int(length)} bytes exceeds the limit of "
                               f"{MAX_BODY_BYTES} bytes")
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_timed(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed_ms = (time.perf_counter() - started) * 1000
                headers = [*message.get("headers", []),
                           (b"server-timing", f"app;dur={elapsed_ms:.3f}".encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_timed)
            else:
                await self.app(scope, limit_body(receive, MAX_BODY_BYTES), send_timed)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request(route, scope.get("method", ""), status,
                                 time.perf_counter() - started)


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    """One line for a 422, and the list of individual problems."""
    issues = []
    for err in exc.errors():
        loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
        issues.append({"loc": loc, "msg": " ".join(str(err.get("msg", "invalid")).split())})
    if not issues:
        return "invalid request", []
    first = issues[0]
    detail = f"{'.'.join(str(p) for p in first['loc']) or 'request'}: {first['msg']}"
    if any(err.get("type") == "too_long" and tuple(err.get("loc", ()))[-1:] == ("sample_ids",)
           for err in exc.errors()):
        detail += f" (a lookup takes at most {MAX_BATCH} sample ids per request)"
    if len(issues) > 1:
        detail += f" (and {len(issues) - 1} more)"
    return detail, issues


def _document_bearer_auth(app: FastAPI) -> None:
    """Declare the bearer token in the OpenAPI document (ObserveMiddleware enforces it)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "the service's bearer token"}}
            for path, operations in schema["paths"].items():
                if path != "/healthz":
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


async def _flush_loop(metrics: ServeMetrics, log: logging.Logger) -> None:
    """Hand the recorded metrics to Ray every METRICS_FLUSH_S seconds."""
    while True:
        await asyncio.sleep(METRICS_FLUSH_S)
        try:
            metrics.flush()
        except Exception:  # noqa: BLE001 - metrics must never stop the service
            log.exception("metrics flush failed")


async def _reload_loop(registry: RunRegistry, interval_s: float, log: logging.Logger) -> None:
    """Re-check the run folders every ``interval_s`` seconds, loading off the event loop."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            for change in await asyncio.to_thread(registry.refresh):
                log.info("reload: %s", change)
        except Exception:  # noqa: BLE001 - the loop must outlive any one failure
            log.exception("reload check failed")


def build_api(*, registry: RunRegistry, settings: ServeSettings, metrics: ServeMetrics,
              reload: bool = True, log: logging.Logger | None = None) -> FastAPI:
    """The lookup API over ``registry``; ``reload`` starts the periodic re-check on startup."""
    log = log or logging.getLogger("raycurv.serve")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_flush_loop(metrics, log))]
        if reload:
            tasks.append(asyncio.create_task(
                _reload_loop(registry, settings.reload_interval_s, log)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            metrics.flush()

    app = FastAPI(title="raycurv lookup", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    token = settings.token.get_secret_value() if settings.token else None
    app.add_middleware(ObserveMiddleware, metrics=metrics, token=token)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail, issues = _validation_detail(exc)
        return JSONResponse({"detail": detail, "errors": issues}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # an unparseable body is malformed input, like any other
            detail = f"body: {exc.detail} (send JSON like {{\"sample_ids\": [1, 2]}})"
            return JSONResponse({"detail": detail, "errors": [{"loc": ["body"], "msg": detail}]},
                                status_code=422)
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(payloads.NotFound)
    @app.exception_handler(Unavailable)
    async def on_not_found(_: Request, exc: LookupError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %r", request.method, request.url.path, exc)
        return _error(500, "internal error; the service log has the details")

    unauthorized = {401: {"model": ErrorResponse, "description": "missing or wrong bearer token"}}
    api = APIRouter(responses=unauthorized if token else {})
    not_found, invalid = NOT_FOUND, INVALID

    @app.get("/healthz", response_model=HealthResponse, tags=["service"],
             responses={503: {"model": HealthResponse, "description": "no table loaded yet"}})
    async def healthz() -> JSONResponse:
        """Ready (200) once at least one table is loaded; 503 before. Needs no token."""
        loaded = registry.loaded()
        body = {"status": "ok" if loaded else "loading", "runs_loaded": loaded}
        return JSONResponse(body, status_code=200 if loaded else 503)

    @api.get("/v1/runs", response_model=RunsResponse, tags=["runs"])
    async def list_runs() -> Response:
        """Runs served, with their table's metadata and reload state."""
        return json_response(payloads.runs_payload(registry))

    @api.get(ROUTE_SAMPLE, response_model=SampleResponse, tags=["runs"],
             responses={**not_found, **invalid})
    async def get_sample(run: str, sample_id: SampleIdPath) -> Response:
        """One sample's row: its curvature (higher = more memorized), rank (1 = highest), ..."""
        index = payloads.resolve(registry, run)
        body = payloads.sample_payload(index, sample_id)
        metrics.rows(ROUTE_SAMPLE, 1)
        return json_response(body)

    @api.post(ROUTE_LOOKUP, response_model=LookupResponse, tags=["runs"],
              responses={**not_found, **invalid,
                         413: {"model": ErrorResponse, "description": "body too large"}})
    async def lookup(run: str, request: LookupRequest) -> Response:
        """Rows for up to 10,000 sample ids, in request order; unknown ids come back in
        ``missing``."""
        index = payloads.resolve(registry, run)
        body, rows = payloads.lookup_payload(index, request.sample_ids)
        metrics.rows(ROUTE_LOOKUP, rows)
        return json_response(body)

    @api.get(ROUTE_TOP, response_model=TopResponse, tags=["runs"],
             responses={**not_found, **invalid})
    async def top(
        run: str,
        k: Annotated[int, Query(ge=1, le=MAX_K, description="rows to return")] = 10,
        label: Annotated[int | None, Query(ge=0, le=INT32_MAX,
                                           description="only samples trained with this label")] = None,
        order: Annotated[Literal["desc", "asc"], Query(
            description="desc: most memorized (rank 1) first; asc: least memorized first")] = "desc",
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET,
                                     description="matching samples to skip (paging)")] = 0,
        corrupted: Annotated[bool | None, Query(
            description="only samples whose label injected noise changed (true) or did not")] = None,
        injected: Annotated[bool | None, Query(
            description="only injected duplicates (true), or only the other samples")] = None,
    ) -> Response:
        """The k most (or least) memorized samples after ``offset``, of those matching the
        filters (label, corrupted, injected); ``total`` counts every match."""
        index = payloads.resolve(registry, run)
        body, rows = payloads.top_payload(index, k=k, label=label, order=order, offset=offset,
                                          corrupted=corrupted, injected=injected)
        metrics.rows(ROUTE_TOP, rows)
        return json_response(body)

    @api.get("/v1/runs/{run}/summary", response_model=SummaryResponse, tags=["runs"],
             responses=not_found)
    async def summary(run: str) -> Response:
        """Score distribution, per-label counts, and how well curvature and csl find the
        injected noisy labels and duplicates (where the run injected them)."""
        index = payloads.resolve(registry, run)
        body = await asyncio.to_thread(payloads.summary_payload, index)
        return json_response(body)

    @api.get("/metrics", response_model=None, tags=["service"],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"}})
    async def prometheus() -> Response:
        """Request, latency, row and table metrics of the replica that answers, in Prometheus
        text format. Service-wide figures (every replica once) are Ray's export of the same
        metrics, ``ray_raycurv_serve_*``, on each node's metrics export port."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="raycurv lookup")

    app.include_router(api)
    app.include_router(build_extra_routes(registry=registry, extras=Extras(), metrics=metrics,
                                          responses=unauthorized if token else {}))
    app.include_router(build_ui_routes(token_required=token is not None))
    if token:
        _document_bearer_auth(app)
    return app
