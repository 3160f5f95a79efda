"""Typed run specs: the one home of raycurv's defaults. Loaded from flags or a YAML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raycurv.errors import UsageError
from raycurv.model_instance import ModelInstance
from raycurv.storage import is_uri

NoiseKind = Literal["symmetric", "pairwise"]
Variant = Literal["norm", "trace"]
Method = Literal["fd", "hvp"]
Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["cosine", "step", "constant"]

# The estimator's defaults (see the README's "Defaults, chosen by measurement"): h in normalized
# input units, n Rademacher probes, the "norm" variant.
DEFAULT_H = 0.03
DEFAULT_PROBES = 2
DEFAULT_VARIANT: Variant = "norm"

# More classes than any image dataset has: labels beyond this are a mistake (a Parquet label of
# 10**9 would otherwise build a billion-way output layer); --max-classes raises it.
MAX_CLASSES = 100_000


class _Spec(BaseModel):
    """A spec section: unknown keys and non-finite numbers (inf, NaN) are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataSpec(_Spec):
    """Which samples, and what label noise or duplicates to inject (seeded)."""

    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    limit: int | None = Field(default=None, ge=1)
    noise: float = Field(default=0.0, ge=0.0, lt=1.0)
    noise_kind: NoiseKind = "symmetric"
    duplicates: int = Field(default=0, ge=0)
    augment: bool | None = None  # None: the dataset's own default
    image_column: str = "image"
    label_column: str = "label"
    path_column: str | None = None  # Parquet: a column naming each sample's source (else file#row)
    image_size: str | None = None  # image folders and Parquet: resize to "H" or "HxW"
    max_classes: int = Field(default=MAX_CLASSES, ge=2)
    # search the images for duplicate groups whose labels disagree at the end of a run (the
    # suspected column's conflicting_duplicate; raycurv.duplicates)
    duplicate_search: bool = True


class TrainSpec(_Spec):
    """SGD with momentum and weight decay; a cosine, step or constant learning-rate schedule."""

    # a registered name or package.module:factory (raycurv.models), or from Python a packed
    # nn.Module instance (JSON: its name)
    model: str | ModelInstance = "small_cnn"
    weights: str | None = None  # a state dict file to start from (local path or URI)
    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=0.01, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=5e-4, ge=0.0)
    schedule: Schedule = "cosine"
    workers: int = Field(default=1, ge=1)
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    max_failures: int = Field(default=3, ge=0)
    # a series of saved weights to score instead of training (raycurv.checkpoints): a folder of
    # .pt/.pth files, a glob or a file; one epoch per file, so ``epochs`` is their number
    checkpoints: str | None = None
    keep_weights: bool = False  # keep <run>/epochs/epoch-EEEE.pt once scored (for --checkpoints)

    @field_validator("weights", "checkpoints")
    @classmethod
    def _weights_absolute(cls, value: str | None) -> str | None:
        """A local weights file (or checkpoint series) is made absolute: training workers and
        actors read it from their own folder."""
        return value if value is None or is_uri(value) else os.path.abspath(value)

    @model_validator(mode="after")
    def _checkpoints_or_weights(self) -> TrainSpec:
        if self.checkpoints is not None and self.weights is not None:
            raise ValueError("checkpoints are scored as they are, without training: weights "
                             "(a state dict to start training from) does not apply")
        return self


class EstimatorSpec(_Spec):
    """One estimator: h (perturbation size, in normalized input units), n probes, variant."""

    model_config = ConfigDict(frozen=True)  # hashable: estimators are deduplicated by value

    h: float = Field(default=DEFAULT_H, gt=0.0)
    probes: int = Field(default=DEFAULT_PROBES, ge=1)
    variant: Variant = DEFAULT_VARIANT

    @property
    def name(self) -> str:
        return f"{self.variant}-h{self.h:g}-n{self.probes}"


class CurvatureSpec(_Spec):
    """The estimator (h, probes, variant; see raycurv.curvature) and the actor pool that runs it.

    ``also`` lists more estimators scored on the same models (a sweep's scoring-only axes): each
    gets its own table under ``<run_dir>/estimators/<name>/``. ``method``: "fd" finite
    differences (the paper's estimator) or "hvp" exact Hessian-vector products; ``precision``
    other than fp32 (mixed precision) only with "hvp". ``optimize`` (batch norm folded, channels
    last) and ``compile`` (torch.compile) change speed and float rounding, not what is computed.
    ``every`` k and ``from_epoch`` choose the scored epochs (cost levers: see ``scores_epoch``).
    """

    h: float = Field(default=DEFAULT_H, gt=0.0)
    probes: int = Field(default=DEFAULT_PROBES, ge=1)
    variant: Variant = DEFAULT_VARIANT
    also: list[EstimatorSpec] = Field(default_factory=list)
    batch_size: int = Field(default=256, ge=1)
    actors: int = Field(default=1, ge=1)
    actor_cpus: float = Field(default=0.5, gt=0.0)
    actor_gpus: float = Field(default=0.0, ge=0.0)
    max_lag: int = Field(default=2, ge=1)
    every: int = Field(default=1, ge=1)
    from_epoch: int = Field(default=0, ge=0)
    method: Method = "fd"
    precision: Precision = "fp32"
    optimize: bool = True
    compile: bool = False

    @model_validator(mode="after")
    def _mixed_precision_needs_hvp(self) -> CurvatureSpec:
        if self.precision != "fp32" and self.method != "hvp":
            raise ValueError(f"precision {self.precision} needs method hvp: a finite difference "
                             "at small h is lost to half-precision rounding")
        return self

    def scores_epoch(self, epoch: int, epochs: int) -> bool:
        """Whether epoch ``epoch`` (0-based) of ``epochs`` is scored: from ``from_epoch`` on, every
        ``every``-th epoch counted back from the last, which is always scored."""
        return epoch >= self.from_epoch and (epochs - 1 - epoch) % self.every == 0

    @property
    def estimators(self) -> list[EstimatorSpec]:
        """The primary estimator first, then ``also`` without repeats."""
        primary = EstimatorSpec(h=self.h, probes=self.probes, variant=self.variant)
        return list(dict.fromkeys([primary, *self.also]))


class ScoreSpec(_Spec):
    """Everything a scoring run needs; the run folder's record (raycurv.runfolder) holds it, resolved."""

    name: str | None = None
    seed: int = 0
    run_dir: str = "runs/digits"
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    curvature: CurvatureSpec = Field(default_factory=CurvatureSpec)

    @field_validator("run_dir")
    @classmethod
    def _run_dir_absolute(cls, value: str) -> str:
        """A local run folder is made absolute: training workers and actors, whose working
        folder is not the driver's, must write to the same place."""
        if not value.strip():
            raise ValueError("run_dir must not be empty")
        return value if is_uri(value) else os.path.abspath(value)

    @property
    def run_name(self) -> str:
        return self.name or Path(self.run_dir).name


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, binary, malformed or absurdly nested file is a UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise UsageError(f"config file {path} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: values in ``overrides`` win; sub-mappings merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
