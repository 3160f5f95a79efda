"""The Feldman-Zhang subsampling estimate of memorization, on Ray: the accepted definition that
curvature scores are checked against.

    mem(i) = P[model predicts y_i on x_i | i in its training subset]
           - P[model predicts y_i on x_i | i held out]

estimated from M models, each trained on its own random subset of ``keep`` * N samples (the same
size for every model), with y_i the label trained on (after any injected noise). mem is in
[-1, 1]; higher = more memorized: the model gets the sample right only when it has seen it (a
mislabeled sample, an atypical one). A typical sample has mem near 0: it is predicted correctly
whether or not it was trained on.

Models are trained many at a time inside each Ray task: a task holds K independent networks as
one "ensemble" module whose parameters are stacked along a leading model axis (batched matmuls
for the MLP, grouped convolutions for the CNN). The loss is the sum of the K models' mean batch
losses, so each model's gradient, momentum and weight decay are exactly its own: training
together is training separately, only faster. Every model's subset, initial weights and batch
order are a function of (seed, model index) alone, so the estimate does not depend on how models
were split into tasks.

Models (``--model``): ``mlp`` (default): flatten -> Linear(D, width) -> ReLU -> Linear(width,
classes); ``cnn``: conv3x3(C, width/8) -> ReLU -> maxpool2 ->
conv3x3(width/8, width/4) -> ReLU -> maxpool2 -> global average -> Linear(width/4, classes).
Neither has batch norm or dropout; training uses no augmentation. The MLP is the fast default
(1,000 models on digits in minutes on two CPU cores); the CNN costs ~4-5x more and, on clean
digits, agrees better with the curvature of raycurv's small CNN (README: results), because a
reference measures what *its* architecture memorizes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

import raycurv
from raycurv import storage
from raycurv.cluster import check_resources, ensure_ray
from raycurv.config import DataSpec, Schedule
from raycurv.data import in_memory, prepare_dataset
from raycurv.data.transforms import to_input
from raycurv.errors import UsageError
from raycurv.progress import Steps
from raycurv.runfolder import RunFolder

REFERENCE_VERSION = 1
METADATA_KEY = b"raycurv"

REFERENCE_SCHEMA = pa.schema([
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("label", pa.int32(), nullable=False),  # the label trained on (after noise)
    pa.field("mem", pa.float32(), nullable=True),  # null where n_in or n_out is 0
    pa.field("n_in", pa.int32(), nullable=False),  # models that trained on the sample
    pa.field("n_out", pa.int32(), nullable=False),  # models that held it out; n_in + n_out = M
    pa.field("p_in", pa.float32(), nullable=True),  # accuracy on it when trained on
    pa.field("p_out", pa.float32(), nullable=True),  # accuracy on it when held out
])


class ReferenceTrainSpec(BaseModel):
    """How each of the M small models is trained: SGD with momentum, weight decay, a schedule."""

    model_config = ConfigDict(extra="forbid")

    model: Literal["mlp", "cnn"] = "mlp"
    width: int = Field(default=256, ge=8)
    epochs: int = Field(default=40, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=0.2, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    schedule: Schedule = "cosine"


class ReferenceSpec(BaseModel):
    """A reference estimate: which data (the same DataSpec and seed as the run it checks), how
    many models, which share of the data each trains on, and how tasks are laid out on Ray."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    out: str = RunFolder("runs/reference").reference
    data: DataSpec = Field(default_factory=DataSpec)
    train: ReferenceTrainSpec = Field(default_factory=ReferenceTrainSpec)
    models: int = Field(default=1000, ge=2)
    keep: float = Field(default=0.7, gt=0.0, lt=1.0)
    models_per_task: int = Field(default=100, ge=1)
    task_cpus: float = Field(default=1.0, gt=0.0)
    task_gpus: float = Field(default=0.0, ge=0.0)


@dataclass
class ReferenceResult:
    path: str
    table: pa.Table
    seconds: float
    summary: dict[str, Any]  # mean in-subset / held-out accuracy, models, tasks

# --- the batched models ----------------------------------------------------------------------

def _model_seed(seed: int, model_id: int, stream: int) -> int:
    """A 32-bit seed of its own for (seed, model, stream): 0 = subset and batch order, 1 = init."""
    return int(np.random.SeedSequence([seed, 0x726566, model_id, stream]).generate_state(1)[0])


def _uniform(shape: tuple[int, ...], bound: float, generators: list[torch.Generator]) -> torch.Tensor:
    """(K, *shape) with slice k drawn U(-bound, bound) from generator k (PyTorch's default init)."""
    return torch.stack([(torch.rand(shape, generator=g) * 2 - 1) * bound for g in generators])


class EnsembleMLP(nn.Module):
    """K independent one-hidden-layer MLPs D -> width -> classes (ReLU), as batched matmuls.

    Shapes: x (K, B, C, H, W) -> (K, B, D) -> (K, B, width) -> (K, B, classes).
    """

    def __init__(self, generators: list[torch.Generator], in_shape: tuple[int, int, int],
                 num_classes: int, width: int):
        super().__init__()
        dims = [math.prod(in_shape), width, num_classes]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:], strict=True):
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(_uniform((fan_in, fan_out), bound, generators)))
            self.biases.append(nn.Parameter(_uniform((1, fan_out), bound, generators)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            x = torch.relu(x) if i < last else x
        return x

    def activations_per_sample(self) -> int:
        return int(self.weights[0].shape[2])


class EnsembleCNN(nn.Module):
    """K independent tiny CNNs as grouped convolutions (group k = model k):
    conv3x3(C, c1) -> ReLU -> maxpool2 -> conv3x3(c1, c2) -> ReLU -> maxpool2 -> global mean ->
    Linear(c2, classes), with c1 = width / 8 and c2 = width / 4.

    Shapes: x (K, B, C, H, W) -> (B, K*C, H, W) -> (B, K*c1, H/2, W/2) -> (B, K*c2, H/4, W/4)
    -> (K, B, c2) -> (K, B, classes).
    """

    def __init__(self, generators: list[torch.Generator], in_shape: tuple[int, int, int],
                 num_classes: int, width: int):
        super().__init__()
        channels, self.height, self.width_px = in_shape
        self.c1, self.c2 = max(1, width // 8), max(1, width // 4)
        b1, b2 = 1 / math.sqrt(channels * 9), 1 / math.sqrt(self.c1 * 9)
        self.conv1 = nn.Parameter(_uniform((self.c1, channels, 3, 3), b1, generators).flatten(0, 1))
        self.bias1 = nn.Parameter(_uniform((self.c1,), b1, generators).flatten())
        self.conv2 = nn.Parameter(_uniform((self.c2, self.c1, 3, 3), b2, generators).flatten(0, 1))
        self.bias2 = nn.Parameter(_uniform((self.c2,), b2, generators).flatten())
        bh = 1 / math.sqrt(self.c2)
        self.head = nn.Parameter(_uniform((self.c2, num_classes), bh, generators))
        self.head_bias = nn.Parameter(_uniform((1, num_classes), bh, generators))

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if min(x.shape[2:]) >= 2 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, batch = x.shape[:2]
        x = x.transpose(0, 1).reshape(batch, -1, *x.shape[3:])
        x = self._pool(torch.relu(F.conv2d(x, self.conv1, self.bias1, padding=1, groups=k)))
        x = self._pool(torch.relu(F.conv2d(x, self.conv2, self.bias2, padding=1, groups=k)))
        x = x.mean(dim=(2, 3)).view(batch, k, self.c2).transpose(0, 1)
        return torch.baddbmm(self.head_bias, x, self.head)

    def activations_per_sample(self) -> int:
        return self.c1 * self.height * self.width_px


ENSEMBLES = {"mlp": EnsembleMLP, "cnn": EnsembleCNN}


def _lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return 0.1 ** (epoch // max(1, epochs // 3))
    return 1.0


def subset_size(n: int, keep: float) -> int:
    """Samples each model trains on: round(keep * n)."""
    return int(round(keep * n))


def model_subsets(n: int, model_ids: np.ndarray, *, keep: float, seed: int) -> np.ndarray:
    """(K, N) bool: sample positions each model trains on; row k depends on (seed, model_ids[k])."""
    size = subset_size(n, keep)
    mask = np.zeros((len(model_ids), n), dtype=bool)
    for row, model_id in enumerate(model_ids):
        rng = np.random.default_rng(_model_seed(seed, int(model_id), 0))
        mask[row, rng.permutation(n)[:size]] = True
    return mask


def _epoch_orders(subsets: np.ndarray, model_ids: np.ndarray, seed: int, epochs: int):
    """Yield (K, S) positions per epoch: each model's own subset in its own shuffled order."""
    members = [np.flatnonzero(row) for row in subsets]
    rngs = [np.random.default_rng(_model_seed(seed, int(m), 2)) for m in model_ids]
    for _ in range(epochs):
        yield np.stack([idx[rng.permutation(len(idx))] for idx, rng in zip(members, rngs, strict=True)])


def build_ensemble(spec: ReferenceSpec, model_ids: np.ndarray, in_shape: tuple[int, int, int],
                   num_classes: int) -> nn.Module:
    """The K = len(model_ids) models of one task, each initialised from its own seed."""
    generators = [torch.Generator().manual_seed(_model_seed(spec.seed, int(m), 1)) for m in model_ids]
    return ENSEMBLES[spec.train.model](generators, in_shape, num_classes, spec.train.width)


def _fit(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, subsets: np.ndarray,
         model_ids: np.ndarray, spec: ReferenceSpec) -> None:
    """SGD on each model's own subset; the summed loss keeps every model's gradient its own."""
    t = spec.train
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                          weight_decay=t.weight_decay)
    for epoch, order in enumerate(_epoch_orders(subsets, model_ids, spec.seed, t.epochs)):
        for group in opt.param_groups:
            group["lr"] = t.lr * _lr_factor(t.schedule, epoch, t.epochs)
        for start in range(0, order.shape[1], t.batch_size):
            batch = torch.as_tensor(order[:, start:start + t.batch_size], device=inputs.device)
            logits = model(inputs[batch])  # (K, B, classes)
            loss = F.cross_entropy(logits.flatten(0, 1), labels[batch].flatten(),
                                   reduction="sum") / batch.shape[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@torch.no_grad()
def _correct(model: nn.Module, k: int, inputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(K, N) bool: each of the K models' prediction on every sample equals the given label."""
    n = len(labels)
    chunk = max(1, 2**24 // (k * model.activations_per_sample()))
    out = []
    for start in range(0, n, chunk):
        x = inputs[start:start + chunk]
        logits = model(x.unsqueeze(0).expand(k, *x.shape))
        out.append((logits.argmax(-1) == labels[start:start + chunk]).cpu().numpy())
    return np.concatenate(out, axis=1)


def train_models(inputs: np.ndarray, labels: np.ndarray, model_ids: np.ndarray,
                 spec: ReferenceSpec, num_classes: int, device: str = "cpu") -> dict[str, np.ndarray]:
    """Train the models ``model_ids`` together and score them on every sample.

    inputs: (N, C, H, W) normalized float32; labels: (N,) int. Returns per-sample sums over
    these models: ``n_in`` (N,) trained on it, ``correct_in`` (N,) right when trained on it,
    ``correct_out`` (N,) right when held out; and per model (K,): ``acc_in``, ``acc_out``.
    """
    model_ids = np.asarray(model_ids, dtype=np.int64)
    subsets = model_subsets(len(labels), model_ids, keep=spec.keep, seed=spec.seed)
    x = torch.tensor(np.asarray(inputs), dtype=torch.float32, device=device)  # a copy: store arrays are read-only
    y = torch.tensor(np.asarray(labels), dtype=torch.int64, device=device)  # a copy, as x
    model = build_ensemble(spec, model_ids, tuple(inputs.shape[1:]), num_classes).to(device)
    _fit(model, x, y, subsets, model_ids, spec)
    correct = _correct(model, len(model_ids), x, y)
    return {
        "n_in": subsets.sum(0).astype(np.int64),
        "correct_in": (correct & subsets).sum(0).astype(np.int64),
        "correct_out": (correct & ~subsets).sum(0).astype(np.int64),
        "acc_in": (correct & subsets).sum(1) / subsets.sum(1),
        "acc_out": (correct & ~subsets).sum(1) / np.maximum((~subsets).sum(1), 1),
    }


def mem_from_counts(n_in: np.ndarray, correct_in: np.ndarray, correct_out: np.ndarray,
                    models: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mem, p_in, p_out), each (N,) float64: mem = p_in - p_out; NaN where a side has no model."""
    n_in = np.asarray(n_in, dtype=np.float64)
    n_out = models - n_in
    with np.errstate(invalid="ignore", divide="ignore"):
        p_in = np.where(n_in > 0, correct_in / n_in, np.nan)
        p_out = np.where(n_out > 0, correct_out / n_out, np.nan)
    return p_in - p_out, p_in, p_out


# --- on Ray ----------------------------------------------------------------------------------

def _task(inputs: np.ndarray, labels: np.ndarray, model_ids: np.ndarray, spec_json: dict[str, Any],
          num_classes: int) -> dict[str, np.ndarray]:
    """Ray task body: one group of models (see ``train_models``)."""
    spec = ReferenceSpec.model_validate(spec_json)
    torch.set_num_threads(max(1, int(spec.task_cpus)))
    device = "cuda" if spec.task_gpus > 0 and torch.cuda.is_available() else "cpu"
    out = train_models(inputs, labels, model_ids, spec, num_classes, device)
    out["model_ids"] = model_ids
    return out


def _task_groups(models: int, per_task: int) -> list[np.ndarray]:
    return [np.arange(a, min(a + per_task, models)) for a in range(0, models, per_task)]


def _run_tasks(spec: ReferenceSpec, inputs: np.ndarray, labels: np.ndarray, num_classes: int,
               progress: Callable[[int, int], None]) -> dict[str, np.ndarray]:
    """Submit one task per group of models and sum their counts as they finish."""
    remote = ray.remote(_task).options(num_cpus=spec.task_cpus, num_gpus=spec.task_gpus,
                                       max_retries=2)
    inputs_ref, labels_ref = ray.put(inputs), ray.put(labels)
    spec_json = spec.model_dump(mode="json")
    pending = [remote.remote(inputs_ref, labels_ref, ids, spec_json, num_classes)
               for ids in _task_groups(spec.models, spec.models_per_task)]
    n = len(labels)
    total = {"n_in": np.zeros(n, np.int64), "correct_in": np.zeros(n, np.int64),
             "correct_out": np.zeros(n, np.int64),
             "acc_in": np.zeros(spec.models), "acc_out": np.zeros(spec.models)}
    done = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        part = ray.get(ready[0])
        for key in ("n_in", "correct_in", "correct_out"):
            total[key] += part[key]
        total["acc_in"][part["model_ids"]] = part["acc_in"]
        total["acc_out"][part["model_ids"]] = part["acc_out"]
        done += len(part["model_ids"])
        progress(done, spec.models)
    return total


def check_spec(spec: ReferenceSpec):
    """Checks that need no cluster; returns the prepared dataset."""
    data = in_memory(prepare_dataset(spec.data, seed=spec.seed))  # small data: decoded here
    size = subset_size(len(data), spec.keep)
    if size < 1 or size >= len(data):
        raise UsageError(f"--keep {spec.keep} of {len(data)} samples leaves {size} to train on; "
                         "every model must train on some samples and hold some out")
    if spec.train.model == "cnn" and min(data.input_shape[1:]) < 4:
        raise UsageError(f"the cnn reference model needs images of at least 4x4, got {data.input_shape[1:]}")
    if spec.out.endswith("/") or (not storage.is_uri(spec.out) and Path(spec.out).is_dir()):
        raise UsageError(f"--out must name a file, got the folder {spec.out}")
    return data


def estimate(spec: ReferenceSpec, *, address: str | None = None,
             progress: Callable[[int, int], None] | None = None) -> ReferenceResult:
    """Train ``spec.models`` models on Ray, write the reference table to ``spec.out``, return it.
    ``progress(models done, models)`` after each task; None: a bar on stderr (raycurv.progress)."""
    started = time.perf_counter()
    data = check_spec(spec)
    ensure_ray(address, cpus_needed=spec.task_cpus)
    check_resources(cpus=spec.task_cpus, gpus=spec.task_gpus)
    inputs = to_input(data.images, data.norm).numpy()
    with Steps("reference models", spec.models, unit="model") as steps:
        total = _run_tasks(spec, inputs, data.labels, data.num_classes,
                           progress or (lambda done, _: steps.step(done=done)))
    seconds = time.perf_counter() - started
    summary = {"models": spec.models, "tasks": len(_task_groups(spec.models, spec.models_per_task)),
               "subset_size": subset_size(len(data), spec.keep),
               "mean_acc_in": float(total["acc_in"].mean()),
               "mean_acc_out": float(total["acc_out"].mean()), "seconds": round(seconds, 1)}
    table = reference_table(data, total, spec, summary)
    write_reference(table, spec.out)
    return ReferenceResult(path=spec.out, table=table, seconds=seconds, summary=summary)


# --- the reference table ---------------------------------------------------------------------

def reference_table(data, total: dict[str, np.ndarray], spec: ReferenceSpec,
                    summary: dict[str, Any]) -> pa.Table:
    """One row per sample (sample_id order): mem, n_in, n_out, p_in, p_out; settings as metadata."""
    mem, p_in, p_out = mem_from_counts(total["n_in"], total["correct_in"], total["correct_out"],
                                       spec.models)
    n_in = total["n_in"].astype(np.int32)

    def floats(values: np.ndarray) -> pa.Array:
        return pa.array(values.astype(np.float32), mask=np.isnan(values))

    arrays = [pa.array(data.sample_ids, pa.int64()), pa.array(data.labels.astype(np.int32)),
              floats(mem), pa.array(n_in), pa.array((spec.models - n_in).astype(np.int32)),
              floats(p_in), floats(p_out)]
    meta = {"kind": "feldman-zhang-reference", "reference_version": REFERENCE_VERSION,
            "raycurv_version": raycurv.__version__, "dataset": data.name,
            "dataset_fingerprint": data.fingerprint, "n": len(data), "classes": data.num_classes,
            "spec": spec.model_dump(mode="json"), **summary,
            "created": datetime.now(UTC).isoformat(timespec="seconds")}
    schema = REFERENCE_SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def write_reference(table: pa.Table, location: str) -> None:
    """Write atomically (a local path or a pyarrow URI)."""
    storage.write_parquet(location, table)


def read_reference(location: str) -> tuple[pa.Table, dict[str, Any]]:
    """Read and check a reference table; returns (table, its metadata). Bad files: UsageError."""
    if not storage.is_file(str(location)):
        raise UsageError(f"no reference table at {location}")
    try:
        table = storage.read_parquet(str(location))
    except Exception as exc:
        raise UsageError(f"cannot read {location}: {str(exc).splitlines()[0]}") from None
    missing = [f.name for f in REFERENCE_SCHEMA if f.name not in table.column_names]
    if missing:
        raise UsageError(f"{location} is not a reference table (missing {', '.join(missing)})")
    try:
        meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise UsageError(f"{location} has no raycurv reference metadata") from None
    if meta.get("kind") != "feldman-zhang-reference":
        raise UsageError(f"{location} is not a reference table (kind {meta.get('kind')!r})")
    return table.cast(REFERENCE_SCHEMA.with_metadata(table.schema.metadata)), meta
