"""What every route module of the lookup API shares: the sample-id path parameter, the documented
error answers, and raw JSON responses."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from fastapi.responses import Response

from raycurv.serve.schemas import MAX_SAMPLE_ID, ErrorResponse, ValidationErrorResponse

SampleIdPath = Annotated[int, Path(ge=0, le=MAX_SAMPLE_ID, description="sample_id to look up")]

NOT_FOUND = {404: {"model": ErrorResponse, "description": "unknown run or sample"}}
INVALID = {422: {"model": ValidationErrorResponse, "description": "malformed request"}}


def json_response(body: bytes, *, status_code: int = 200) -> Response:
    """A JSON body the payload builders made from a validated table (no re-validation; the
    shapes are the documented response models, which the tests check)."""
    return Response(body, status_code=status_code, media_type="application/json")
