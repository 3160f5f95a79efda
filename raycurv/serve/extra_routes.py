"""Routes that show a sample and a run beyond its table row: the image (PNG), the per-epoch
curvature, the duplicate group, the curvature histogram, the class names.

Their data is loaded on first use (raycurv.serve.extras) in a worker thread; a run whose images
or per-epoch table cannot be had answers 404 saying why. Higher curvature = more memorized.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query
from fastapi.responses import Response

from raycurv.class_names import class_names
from raycurv.serve import payloads
from raycurv.serve.extra_schemas import (
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    ClassesResponse,
    DuplicatesResponse,
    HistogramResponse,
    RunEpochsResponse,
    SampleEpochsResponse,
)
from raycurv.serve.extras import Extras
from raycurv.serve.prometheus import ServeMetrics
from raycurv.serve.registry import RunRegistry
from raycurv.serve.routing import INVALID, NOT_FOUND, SampleIdPath, json_response

ROUTE_IMAGE = "/v1/runs/{run}/samples/{sample_id}/image"
ROUTE_SAMPLE_EPOCHS = "/v1/runs/{run}/samples/{sample_id}/epochs"
ROUTE_DUPLICATES = "/v1/runs/{run}/samples/{sample_id}/duplicates"
IMAGE_CACHE_CONTROL = "private, max-age=300"
PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
             "description": "the sample's image"}}
UNREACHABLE = {404: {**NOT_FOUND[404],
                     "description": "unknown run or sample, or the run's data is not reachable "
                                    "(the message says why)"}}


def _floats(values) -> list[float | None]:
    """JSON-safe floats: non-finite values become null."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def _dumps(body: dict) -> bytes:
    return json.dumps(body, allow_nan=False).encode()


def build_extra_routes(*, registry: RunRegistry, extras: Extras, metrics: ServeMetrics,
                       responses: dict) -> APIRouter:
    """The routes over ``registry``'s runs; ``responses`` are documented on every route."""
    router = APIRouter(responses=responses, tags=["samples"])

    @router.get(ROUTE_IMAGE, response_class=Response, responses={**PNG, **UNREACHABLE, **INVALID})
    async def image(
        run: str, sample_id: SampleIdPath,
        size: Annotated[int | None, Query(
            ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE,
            description="longer side in pixels (native size when absent); enlarged images keep "
                        "their pixels sharp")] = None,
    ) -> Response:
        """The sample's image as PNG, from the run's dataset; cached per replica."""
        index = payloads.resolve(registry, run)
        position = payloads.locate(index, sample_id)
        run_extras = extras.of(index)
        body = run_extras.cached_png(position, size)
        if body is None:
            body = await asyncio.to_thread(run_extras.png, position, size)
        return Response(body, media_type="image/png",
                        headers={"Cache-Control": IMAGE_CACHE_CONTROL})

    @router.get(ROUTE_SAMPLE_EPOCHS, response_model=SampleEpochsResponse,
                responses={**UNREACHABLE, **INVALID})
    async def sample_epochs(run: str, sample_id: SampleIdPath) -> Response:
        """The sample's curvature after each scored epoch (its score is their mean)."""
        index = payloads.resolve(registry, run)
        payloads.locate(index, sample_id)
        curves = await asyncio.to_thread(extras.of(index).epochs.get)
        epochs, values = curves.curve(sample_id)
        return json_response(_dumps({"run": index.run, "sample_id": sample_id,
                                     "epochs": epochs.tolist(), "curvature": _floats(values)}))

    @router.get("/v1/runs/{run}/epochs", response_model=RunEpochsResponse, tags=["runs"],
                responses=UNREACHABLE)
    async def run_epochs(run: str) -> Response:
        """The median and 10-90 % band of all samples' curvature after each scored epoch."""
        index = payloads.resolve(registry, run)
        curves = await asyncio.to_thread(extras.of(index).epochs.get)
        low, mid, high = curves.band
        return json_response(_dumps({"run": index.run, "epochs": curves.band_epochs.tolist(),
                                     "p10": _floats(low), "median": _floats(mid),
                                     "p90": _floats(high)}))

    @router.get(ROUTE_DUPLICATES, response_model=DuplicatesResponse,
                responses={**NOT_FOUND, **INVALID})
    async def duplicates(run: str, sample_id: SampleIdPath) -> Response:
        """The sample's known duplicate group (injected copies; identical pixels where the
        images are reachable), rows in rank order, the sample included."""
        index = payloads.resolve(registry, run)
        position = payloads.locate(index, sample_id)
        groups = await asyncio.to_thread(extras.of(index).groups.get)
        members = groups.members(position)
        members = members[np.argsort(index.columns["rank"][members], kind="stable")]
        metrics.rows(ROUTE_DUPLICATES, len(members))
        head = _dumps({"run": index.run, "sample_id": sample_id,
                       "searched": list(groups.searched), "not_searched": groups.not_searched,
                       "conflicting": len(set(index.columns["label"][members].tolist())) > 1})
        return json_response(head[:-1] + b',"rows":' + index.rows_json(members) + b"}")

    @router.get("/v1/runs/{run}/histogram", response_model=HistogramResponse, tags=["runs"],
                responses=NOT_FOUND)
    async def histogram(run: str) -> Response:
        """Curvature counts in log-spaced bins for clean samples, corrupted labels and injected
        copies."""
        index = payloads.resolve(registry, run)
        body = await asyncio.to_thread(extras.of(index).histogram.get)
        return json_response(_dumps({"run": index.run, **body}))

    @router.get("/v1/runs/{run}/classes", response_model=ClassesResponse, tags=["runs"],
                responses=NOT_FOUND)
    async def classes(run: str) -> Response:
        """The names of the run's labels: from its table's metadata, else the dataset's own;
        null where neither has them."""
        index = payloads.resolve(registry, run)
        names = class_names(index.metadata)
        return json_response(_dumps({"run": index.run,
                                     "names": list(names) if names else None}))

    return router
