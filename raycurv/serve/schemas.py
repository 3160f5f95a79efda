"""Typed request and response models of the lookup API (contract v1; rows carry the score
table's contract-1.2 columns).

Direction of the scores: higher ``curvature`` = more memorized; ``rank`` 1 = highest curvature;
``percentile`` = share of samples with strictly lower curvature, in [0, 1]; lower ``aum`` and
``margin``, more ``forgetting_events``, a later (or null) ``learned_epoch`` = more likely
mislabeled or memorized (raycurv.dynamics).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from raycurv.detection import Score, Target
from raycurv.suspected import KINDS

MAX_BATCH = 10_000  # sample ids per lookup request
MAX_K = 10_000  # rows per top-k request
MAX_SAMPLE_ID = 2**53 - 1  # the largest integer every JSON client reads exactly



def _json_integer(value: Any) -> Any:
    """A JSON number with no fractional part (1 and 1.0, as JSON Schema's "integer"); never a
    string or a boolean."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("a sample id must be a JSON integer")
    return value


SampleId = Annotated[int, Field(ge=0, le=MAX_SAMPLE_ID, description="a sample_id, 0 to 2**53-1"),
                     BeforeValidator(_json_integer)]


class SampleRow(BaseModel):
    """One row of a score table."""

    sample_id: int = Field(description="index of the sample in the dataset's canonical order")
    label: int = Field(description="label the model was trained on (after injected noise)")
    original_label: int = Field(description="label before injected noise")
    corrupted: bool = Field(description="the label was changed by injected noise")
    duplicate_of: int | None = Field(description="for an injected duplicate, the sample it copies")
    curvature: float = Field(description="mean per-epoch input-loss curvature; higher = more memorized")
    epochs_scored: int = Field(description="epochs that went into the mean")
    csl: float | None = Field(description="cumulative training loss over epochs; higher = more memorized")
    final_loss: float | None = Field(description="loss of the last model on the trained label")
    final_confidence: float | None = Field(description="confidence of the last model in the trained label")
    final_pred: int = Field(description="prediction of the last model")
    rank: int = Field(description="1 = highest curvature (most memorized)")
    percentile: float = Field(description="share of samples with strictly lower curvature, in [0, 1]")
    aum: float | None = Field(default=None, description=(
        "area under the margin: the training pass's logit of the label minus the largest other, "
        "averaged over epochs; lower = more likely mislabeled; null without a training record"))
    margin: float | None = Field(default=None, description=(
        "the same with softmax probabilities, in [-1, 1]; lower = more likely mislabeled"))
    forgetting_events: int | None = Field(default=None, description=(
        "correct-to-incorrect transitions between consecutive epochs in the training pass"))
    learned_epoch: int | None = Field(default=None, description=(
        "first epoch from which the training pass got the sample right in every later epoch; "
        "null if it was wrong in the last epoch (or without a training record)"))
    suspected: Literal[KINDS] | None = Field(default=None, description=(
        "what the sample stands out as (null: nothing, or a table older than 1.2): "
        "conflicting_duplicate (in a duplicate group whose labels disagree), mislabel (high "
        "csl and the final model predicts another class), atypical (high curvature, the "
        "model agrees with its label); the rule: the run's metadata, suspected.rule"))


class LookupRequest(BaseModel):
    """Sample ids to look up in one run."""

    model_config = ConfigDict(extra="forbid")

    sample_ids: list[SampleId] = Field(
        min_length=1, max_length=MAX_BATCH,
        description=f"1 to {MAX_BATCH} sample ids; rows come back in this order",
    )


class HealthResponse(BaseModel):
    """Readiness: ok once at least one table is loaded."""

    status: Literal["ok", "loading"]
    runs_loaded: int


class RunInfo(BaseModel):
    """A served run: its table's state, reload history and metadata."""

    name: str
    path: str = Field(description="the score table file")
    status: Literal["serving", "failed"] = Field(
        description="serving: a table answers queries; failed: no table could be loaded yet")
    rows: int | None
    loaded_at: float | None = Field(description="Unix time the served table was loaded")
    load_seconds: float | None
    loads: int = Field(description="tables loaded for this run since start")
    reload_failures: int = Field(description="table versions refused since start")
    last_error: str | None = Field(
        description="why the newest file was refused (the previous table keeps serving)")
    metadata: dict[str, Any] = Field(description="the table's raycurv schema metadata")


class RunsResponse(BaseModel):
    """Every run the service knows about."""

    runs: list[RunInfo]


class SampleResponse(BaseModel):
    """One sample of one run."""

    run: str
    sample: SampleRow


class LookupResponse(BaseModel):
    """Rows for the requested ids that exist (in request order), and those that do not."""

    run: str
    rows: list[SampleRow]
    missing: list[int] = Field(description="requested ids the table does not have")


class TopResponse(BaseModel):
    """The k most (order=desc) or least (order=asc) memorized samples."""

    run: str
    order: Literal["desc", "asc"]
    label: int | None
    k: int
    total: int = Field(description="samples matching the label filter (all when no filter)")
    rows: list[SampleRow]


class Stats(BaseModel):
    """Distribution of one score column (nearest-rank quantiles)."""

    min: float
    max: float
    mean: float
    std: float
    quantiles: dict[str, float]


class LabelSummary(BaseModel):
    """Samples trained with one label."""

    label: int
    count: int
    corrupted: int
    mean_curvature: float


class Detection(BaseModel):
    """How well a score (higher = more memorized) finds the known-bad samples of the run; the
    figures of ``raycurv evaluate`` (raycurv.detection). A figure is null where the comparison
    holds a single class."""

    target: Target = Field(description=(
        "corrupted: samples whose label was changed by injected noise, told apart from all other "
        "samples; duplicate: injected conflicting duplicates, told apart from the clean samples "
        "(neither corrupted nor copies)"))
    score: Score
    positives: int = Field(description="samples of the target within its comparison")
    auroc: float | None = Field(description="area under the ROC curve (scikit-learn), ties counted half")
    average_precision: float | None = Field(description="scikit-learn's average precision")
    precision_at_k: float | None = Field(
        description="precision among the k highest scores, k = positives, ties in row order")


class SummaryResponse(BaseModel):
    """Score distribution, per-label counts, and detection metrics where the truth is known."""

    run: str
    rows: int
    classes: int
    epochs_scored: int | None
    corrupted: int
    duplicates: int
    curvature: Stats | None
    csl: Stats | None
    aum: Stats | None = Field(default=None, description="null for a table without co-scores")
    by_label: list[LabelSummary]
    detection: list[Detection]


class ErrorResponse(BaseModel):
    """A client error, explained in one line."""

    detail: str


class ValidationIssue(BaseModel):
    """One invalid part of a request."""

    loc: list[str | int]
    msg: str


class ValidationErrorResponse(BaseModel):
    """A malformed request (422): one line, and the individual problems."""

    detail: str
    errors: list[ValidationIssue]
