"""Score weights a user already has: a series of saved state dicts, one per epoch, scored by the
same curvature actors as a run, with no training. And :class:`Recorder`, the per-epoch hook of a
user's own training loop that saves such a series together with its training records.

A checkpoint series (``raycurv score --checkpoints DIR_OR_GLOB``) is the ``.pt``/``.pth`` files of
a folder, of a glob, or one file, in epoch order: by the number in each file name
(``epoch-0003.pt``, ``ckpt_12.pth``: numbers with no gap, starting anywhere), or by name when no
file name holds a number. Every file is read with ``torch.load(weights_only=True)`` and holds

- a state dict (name -> tensor), or
- a raycurv training checkpoint, ``{"model": state dict, ...}``, or
- an epoch file (``runfolder.EPOCH_FILE``): ``{"epoch": int, "weights": state dict,
  "train_loss", "train_margin", "train_prob_margin": (M,) float32 each}``, the training records of
  raycurv.dynamics. A run writes them to ``<run>/epochs/`` (kept with ``--keep-weights``), its
  records by dataset position (M = N); a Recorder writes them with ``"sample_ids"`` (M,) int64 and
  ``"labels"`` (M,) int64, its records by sample id.

A series of epoch files (every file one) gives exact csl and co-scores. Without training records
(any file a plain state dict or training checkpoint) they are unknown: the actors are handed a zero
training loss, so csl is 0 (the score table's csl column admits no null) and the co-scores are
null, and the table's metadata says ``"training_records": false``. Curvature is the same either
way: higher = more memorized.
"""

from __future__ import annotations

import glob
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from raycurv import storage
from raycurv.dynamics import TRAINING_RECORDS, training_margins
from raycurv.errors import UsageError
from raycurv.models import ModelChoice, build_model
from raycurv.runfolder import EPOCH_FILE, epoch_file

if TYPE_CHECKING:  # Ray: only to score
    from raycurv.actors import CurvaturePool
    from raycurv.config import ScoreSpec
    from raycurv.data import Prepared

SUFFIXES = (".pt", ".pth")
METADATA_KEYS = ("checkpoints", "training_records")  # what a checkpoint run adds to table metadata
_GLOB_CHARS = re.compile(r"[*?\[]")
_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last number in a file name
_SHOWN = 3  # names or ids quoted in a one-line error


@dataclass(frozen=True)
class Series:
    """A checked checkpoint series: ``locations`` in epoch order (epoch k = ``locations[k]``);
    ``training_records``: every file is an epoch file with records of every sample."""

    pattern: str
    locations: tuple[str, ...]
    training_records: bool

    @property
    def epochs(self) -> int:
        return len(self.locations)


# --- finding and checking a series: everything before Ray starts ------------------------------

def find_checkpoints(pattern: str) -> list[str]:
    """The checkpoint files ``pattern`` names (a folder, a local glob or one file; a folder or a
    file may be a URI), in epoch order (see the module docstring). Raises UsageError (one line)
    when there are none, a name is not ``.pt``/``.pth``, or the numbered names skip an epoch."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise UsageError(f"checkpoints must be a folder, a glob or a file, got {pattern!r}")
    return _order(_list_checkpoints(pattern), pattern)


def check_series(locations: list[str], *, pattern: str, model: ModelChoice,
                 input_shape: tuple[int, ...], num_classes: int, sample_ids: np.ndarray,
                 labels: np.ndarray) -> Series:
    """Read every checkpoint once and check it against ``model`` (built for ``input_shape``
    (C, H, W) and ``num_classes``): the same parameter and buffer names, each of the same shape;
    and check an epoch file's training records against the dataset (``sample_ids``, ``labels``,
    each (N,)). Raises UsageError (one line) naming the first file that does not fit."""
    expected = _shapes(build_model(model, in_channels=input_shape[0], num_classes=num_classes)
                       .state_dict())
    with_records = 0
    for location in locations:
        weights, saved = read_checkpoint(location)
        _check_shapes(weights, expected, location=location, model=str(model))
        if saved is not None:
            training_records(saved, sample_ids=sample_ids, labels=labels, location=location)
            with_records += 1
    return Series(pattern=pattern, locations=tuple(locations),
                  training_records=with_records == len(locations))


def read_checkpoint(location: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(weights, the epoch file whose weights they are, or None for a state dict or training
    checkpoint) of one checkpoint file, read with ``weights_only=True``. Raises UsageError."""
    raw = storage.read_bytes(location)
    if raw is None:
        raise UsageError(f"checkpoint {location} not found")
    try:
        saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or torch errors for a file that is not a checkpoint
        raise UsageError(f"checkpoint {location} is not a torch state dict: "
                         f"{_first_line(exc)}") from None
    if isinstance(saved, dict) and "weights" in saved and "epoch" in saved:
        if saved["weights"] is None:
            raise UsageError(f"checkpoint {location} is an epoch file without weights (an epoch "
                             "its run did not score; keep them all with --keep-weights)")
        return _state_dict(saved["weights"], location), saved
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
        saved = saved["model"]  # a raycurv training checkpoint: its model's weights
    return _state_dict(saved, location), None


def training_records(saved: Mapping[str, Any], *, sample_ids: np.ndarray, labels: np.ndarray,
                     location: str) -> dict[str, np.ndarray]:
    """An epoch file's training records in dataset order: name -> (N,) float32, for the dataset's
    ``sample_ids`` and ``labels`` (N,). A Recorder's file is matched by sample id and must hold
    every sample of the dataset, none else, with the dataset's label; a run's by position.
    Raises UsageError."""
    missing = [name for name in TRAINING_RECORDS if not isinstance(saved.get(name), torch.Tensor)]
    if missing:
        raise UsageError(f"epoch file {location} lacks the training records {', '.join(missing)}")
    records = {name: saved[name].numpy().astype(np.float32, copy=False) for name in TRAINING_RECORDS}
    n = len(sample_ids)
    if "sample_ids" not in saved:  # a run's own: by position
        if any(values.shape != (n,) for values in records.values()):
            raise UsageError(f"epoch file {location} holds records of "
                             f"{len(records['train_loss'])} samples, the dataset has {n}")
        return records
    return _by_sample_id(records, saved, sample_ids=sample_ids, labels=labels, location=location)


def _list_checkpoints(pattern: str) -> list[str]:
    if not storage.is_uri(pattern) and _GLOB_CHARS.search(pattern):
        found = sorted(p for p in glob.glob(pattern) if Path(p).is_file())
        other = [p for p in found if not p.endswith(SUFFIXES)]
        if other:
            raise UsageError(f"{other[0]} (matched by {pattern}) is not a .pt or .pth file")
        if not found:
            raise UsageError(f"no checkpoint files match {pattern}")
        return found
    if storage.is_dir(pattern):
        found = [p for p in storage.list_files(pattern) if p.endswith(SUFFIXES)]
        if not found:
            raise UsageError(f"no .pt or .pth files in {pattern}")
        return found
    if storage.is_file(pattern):
        if not pattern.endswith(SUFFIXES):
            raise UsageError(f"checkpoint {pattern} is not a .pt or .pth file")
        return [pattern]
    raise UsageError(f"no checkpoints at {pattern}: not a folder, a file or a glob that matches")


def _order(locations: list[str], pattern: str) -> list[str]:
    """Epoch order: by the number in each name (one per epoch, no gap), or by name when none is
    numbered."""
    names = [location.rsplit("/", 1)[-1] for location in locations]
    numbers = [_number(name) for name in names]
    if all(number is None for number in numbers):
        return [loc for _, loc in sorted(zip(names, locations, strict=True))]
    if any(number is None for number in numbers):
        plain = [name for name, number in zip(names, numbers, strict=True) if number is None]
        raise UsageError(f"{pattern} mixes file names with and without an epoch number "
                         f"({', '.join(plain[:_SHOWN])}): number every file, or none")
    by_number: dict[int, str] = {}
    for name, number, location in zip(names, numbers, locations, strict=True):
        if number in by_number:
            raise UsageError(f"{pattern}: {by_number[number].rsplit('/', 1)[-1]} and {name} "
                             f"are both epoch {number}")
        by_number[number] = location
    first, last = min(by_number), max(by_number)
    gaps = [k for k in range(first, last + 1) if k not in by_number]
    if gaps:
        raise UsageError(f"the checkpoints of {pattern} skip epoch(s) "
                         f"{', '.join(map(str, gaps[:_SHOWN]))}{' ...' if len(gaps) > _SHOWN else ''}"
                         f" (files numbered {first}..{last}): one file per epoch, none missing")
    return [by_number[k] for k in sorted(by_number)]


def _number(name: str) -> int | None:
    found = _NUMBER.search(name.rsplit(".", 1)[0])
    return int(found.group(1)) if found else None


def _state_dict(value: Any, location: str) -> dict[str, torch.Tensor]:
    if not (isinstance(value, dict) and value
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())):
        raise UsageError(f"checkpoint {location} does not hold a state dict (name -> tensor)")
    return value


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _check_shapes(weights: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]], *,
                  location: str, model: str) -> None:
    got = _shapes(weights)
    problems = [f"{kind} {_some(names)}" for kind, names in (
        ("missing", [name for name in expected if name not in got]),
        ("unexpected", [name for name in got if name not in expected])) if names]
    wrong = [name for name in expected if name in got and got[name] != expected[name]]
    problems += [f"{name} is {list(got[name])}, the model's {list(expected[name])}"
                 for name in wrong[:_SHOWN]]
    if problems:
        raise UsageError(f"checkpoint {location} does not match model {model!r}: "
                         f"{'; '.join(problems)}")


def _some(names: list[str]) -> str:
    """The first few of ``names``, and how many there are in all when more."""
    more = f" ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _by_sample_id(records: dict[str, np.ndarray], saved: Mapping[str, Any], *,
                  sample_ids: np.ndarray, labels: np.ndarray, location: str) -> dict[str, np.ndarray]:
    ids = np.asarray(saved["sample_ids"], dtype=np.int64)
    recorded_labels = np.asarray(saved.get("labels", torch.zeros(0)), dtype=np.int64)
    if any(values.shape != ids.shape for values in records.values()) or recorded_labels.shape != ids.shape:
        raise UsageError(f"epoch file {location}: its sample_ids, labels and records differ in length")
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    at = np.minimum(np.searchsorted(ids, sample_ids), max(len(ids) - 1, 0))
    found = ids[at] == sample_ids if len(ids) else np.zeros(len(sample_ids), bool)
    if not found.all() or len(ids) != len(sample_ids):
        absent = sample_ids[~found]
        detail = (f"lacks sample(s) {', '.join(map(str, absent[:_SHOWN]))}" if len(absent) else
                  f"records {len(ids)} samples, the dataset has {len(sample_ids)}")
        raise UsageError(f"epoch file {location} {detail}: record every sample of the scored "
                         "dataset each epoch, by its raycurv sample_id")
    differ = np.flatnonzero(recorded_labels[order][at] != labels)
    if len(differ):
        k = differ[0]
        raise UsageError(f"epoch file {location}: {len(differ)} recorded label(s) differ from the "
                         f"dataset's (sample {sample_ids[k]}: {recorded_labels[order][at][k]}, "
                         f"dataset {labels[k]}): score the data the loop trained on (same "
                         "--dataset, --limit, --noise, --seed)")
    return {name: values[order][at] for name, values in records.items()}


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --- scoring a series: the actors, no training -----------------------------------------------

def score_series(pool: CurvaturePool, series: Series, *, spec: ScoreSpec, data: Prepared) -> None:
    """Hand every checkpoint of ``series`` to the curvature actors in epoch order (epoch k =
    checkpoint k; an epoch ``spec.curvature`` does not score hands its records only), at most
    ``pool.max_lag`` epochs in flight, and wait for all. Without training records every epoch's
    training loss is handed as 0 and its margins as missing (csl 0, co-scores null)."""
    import ray

    c, pending = spec.curvature, []
    for epoch, location in enumerate(series.locations):
        weights, saved = read_checkpoint(location)
        training = ({"train_loss": np.zeros(len(data), np.float32)} if not series.training_records
                    else training_records(saved, sample_ids=data.sample_ids, labels=data.labels,
                                          location=location))
        scored = c.scores_epoch(epoch, series.epochs)
        pending.append(pool.submit(epoch, weights if scored else None, training))
        while len(pending) > pool.max_lag:
            ray.get(pending.pop(0))
    for refs in pending:
        ray.get(refs)


def series_metadata(series: Series) -> dict[str, Any]:
    """What a checkpoint run adds to its score tables' metadata (METADATA_KEYS): the series, and
    whether csl and the co-scores are real (``training_records`` false: csl 0, co-scores null)."""
    return dict(zip(METADATA_KEYS, (series.pattern, series.training_records), strict=True))


# --- recording a series from your own training loop ------------------------------------------

class Recorder:
    """The per-epoch hook of your own training loop (one process): records each sample's training
    loss, logit margin and probability margin (raycurv.dynamics) from the training pass's logits,
    and saves each epoch's weights with them as an epoch file in ``folder``
    (``epoch-EEEE.pt``, runfolder.EPOCH_FILE). ``raycurv score --checkpoints FOLDER`` then scores
    the weights (higher curvature = more memorized) with exact csl and co-scores.

    Parameters
    ----------
    folder : str or pathlib.Path
        Where the epoch files go: a local folder or a URI. Epochs continue after the epoch files
        already there (0 in an empty folder).
    num_samples : int, optional
        The number of distinct samples trained every epoch: :meth:`end_epoch` refuses an epoch
        that recorded another number (a batch not recorded).

    Examples
    --------
    >>> rec = raycurv.Recorder("ckpts", num_samples=len(data))        # doctest: +SKIP
    >>> for epoch in range(epochs):                                    # doctest: +SKIP
    ...     for ids, x, y in loader:
    ...         logits = model(x)
    ...         F.cross_entropy(logits, y).backward(); opt.step(); opt.zero_grad()
    ...         rec.record(epoch, ids, logits, y)
    ...     rec.end_epoch(epoch, model)

    ``ids`` are raycurv's sample ids of the samples (``raycurv.data.prepare_dataset``'s
    ``sample_ids``) and ``y`` the labels trained on; scoring checks both against its dataset.
    """

    def __init__(self, folder: str | Path, *, num_samples: int | None = None):
        if not isinstance(folder, str | Path) or not str(folder).strip():
            raise UsageError(f"folder must be a path or a URI, got {folder!r}")
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                        or num_samples < 1):
            raise UsageError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        self.folder = str(folder)
        storage.check_writable_folder(self.folder)
        self.num_samples = num_samples
        self.epoch = _next_epoch(self.folder)
        self._batches: list[np.ndarray] = []

    def record(self, epoch: int, sample_ids: Any, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Record one training batch of epoch ``epoch``: ``sample_ids`` (B,) ints (a tensor, an
        array or a list), ``logits`` (B, classes) of the training forward pass, ``labels`` (B,)
        the labels trained on. Detached: recording never touches the gradient."""
        self._check_epoch(epoch)
        if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise UsageError("logits and labels must be torch tensors")
        ids = torch.as_tensor(np.asarray(sample_ids.cpu() if isinstance(sample_ids, torch.Tensor)
                                         else sample_ids))
        if ids.shape != labels.shape or ids.dtype.is_floating_point or (ids < 0).any():
            raise UsageError(f"sample_ids {tuple(ids.shape)} must be (B,) integers >= 0, one per "
                             f"label {tuple(labels.shape)}")
        try:
            self._batches.append(_batch_records(ids, logits.detach(), labels))
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def end_epoch(self, epoch: int, model: nn.Module | Mapping[str, torch.Tensor]) -> str:
        """Save epoch ``epoch``: ``model``'s weights (a module, or its state dict; a
        DistributedDataParallel's inner module) and each recorded sample's records, its mean over
        the times it was recorded this epoch. Returns the epoch file's location."""
        self._check_epoch(epoch)
        if not self._batches:
            raise UsageError(f"epoch {epoch}: nothing recorded (call record for every batch)")
        weights = _weights_of(model)
        ids, labels, records = _epoch_means(np.concatenate(self._batches, axis=1))
        if self.num_samples is not None and len(ids) != self.num_samples:
            raise UsageError(f"epoch {epoch} recorded {len(ids)} distinct samples, not "
                             f"num_samples={self.num_samples}")
        location = epoch_file(self.folder, epoch)
        buf = io.BytesIO()
        torch.save({"epoch": epoch, "weights": weights, "sample_ids": torch.from_numpy(ids),
                    "labels": torch.from_numpy(labels),
                    **{name: torch.from_numpy(row) for name, row in zip(TRAINING_RECORDS, records,
                                                                        strict=True)}}, buf)
        storage.write_bytes(location, buf.getvalue())
        self.epoch, self._batches = epoch + 1, []
        return location

    def _check_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch != self.epoch:
            raise UsageError(f"epoch {epoch!r}: the recorder is at epoch {self.epoch} "
                             f"(epochs count from 0, one after another, after those in {self.folder})")


def _next_epoch(folder: str) -> int:
    """The epoch after the last epoch file in ``folder`` (0 when there is none)."""
    prefix, suffix = EPOCH_FILE.split("{", 1)[0], SUFFIXES[0]
    numbers = [_number(name) for name in (p.rsplit("/", 1)[-1] for p in storage.list_files(folder))
               if name.startswith(prefix) and name.endswith(suffix)]
    return max((n for n in numbers if n is not None), default=-1) + 1


def _batch_records(ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(2 + len(TRAINING_RECORDS), B) float64: sample id, label, then each record of the batch."""
    margin, prob_margin = training_margins(logits, labels)
    loss = F.cross_entropy(logits.float(), labels, reduction="none")
    rows = [ids.double(), labels.detach().cpu().double(),
            *(t.detach().float().cpu().double() for t in (loss, margin, prob_margin))]
    return torch.stack(rows).numpy()


def _epoch_means(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample ids (M,) int64 sorted, their labels (M,) int64, records (len(TRAINING_RECORDS), M)
    float32: each the mean over the sample's rows) of an epoch's batch rows."""
    ids, inverse, counts = np.unique(rows[0].astype(np.int64), return_inverse=True, return_counts=True)
    sums = np.zeros((len(TRAINING_RECORDS), len(ids)))
    np.add.at(sums, (slice(None), inverse), rows[2:])
    labels = np.zeros(len(ids), np.int64)
    labels[inverse] = rows[1].astype(np.int64)
    return ids, labels, (sums / counts).astype(np.float32)


def _weights_of(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        model = getattr(model, "module", model).state_dict()
    if not isinstance(model, Mapping) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise UsageError("model must be a torch.nn.Module or its state dict")
    return {name: tensor.detach().cpu().clone() for name, tensor in model.items()}
