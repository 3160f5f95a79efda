"""Response models of the routes that show a sample and a run beyond its table row: per-epoch
curves, duplicate groups, the curvature histogram, class names (the image route answers PNG).

Direction: higher curvature = more memorized; rank 1 = highest curvature.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from raycurv.serve.schemas import SampleRow

MIN_IMAGE_SIDE = 4
MAX_IMAGE_SIDE = 1024


class SampleEpochsResponse(BaseModel):
    """One sample's curvature after each scored epoch; its score is their mean."""

    run: str
    sample_id: int
    epochs: list[int] = Field(description="scored epochs (0-based), increasing")
    curvature: list[float | None] = Field(
        description="the sample's curvature after each epoch (null where not finite); "
                    "higher = more memorized")


class RunEpochsResponse(BaseModel):
    """The run's curvature over all samples after each scored epoch: median and 10-90 % band."""

    run: str
    epochs: list[int]
    p10: list[float | None]
    median: list[float | None]
    p90: list[float | None]


class DuplicatesResponse(BaseModel):
    """The known duplicate group of a sample: its members' rows in rank order (the sample
    included), or no rows when none is known."""

    run: str
    sample_id: int
    searched: list[Literal["injected", "exact"]] = Field(
        description="injected: the run's injected copies (duplicate_of); exact: identical pixels")
    not_searched: str | None = Field(description="why exact copies were not searched")
    conflicting: bool = Field(description="the members carry different labels")
    rows: list[SampleRow]


class HistogramResponse(BaseModel):
    """Curvature counts in log-spaced bins, per kind of sample."""

    run: str
    edges: list[float] = Field(description="bin edges (one more than the counts), increasing")
    counts: dict[Literal["clean", "corrupted", "duplicate"], list[int]] = Field(
        description="clean: neither corrupted nor an injected copy; corrupted: label changed by "
                    "injected noise; duplicate: an injected copy")


class ClassesResponse(BaseModel):
    """The names of the run's labels, where the run has them."""

    run: str
    names: list[str] | None = Field(description="name of label i at position i; null if unknown")
