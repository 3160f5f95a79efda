"""The run folder: the one module that knows its layout. Every file of it is read and written here,
through raycurv.storage, so a run folder works the same on a local path, file://, s3:// or gs://.

    <run>/run.json                     the resolved spec, the dataset fingerprint (written first)
    <run>/scores.parquet               the score table (contract v1, raycurv.table), validated on write
    <run>/curvature_by_epoch.parquet   sample_id, epoch, curvature of every scored epoch
    <run>/train/                       Ray Train's checkpoints (model, optimizer, scheduler, epoch)
    <run>/shards/shard-KKKK/epoch-EEEE.npz
                                       what each curvature actor recorded of each epoch: written
                                       once per epoch, never rewritten (shard-KKKK.npz, the whole
                                       state in one file as earlier versions kept it, is split)
    <run>/epochs/epoch-EEEE.pt         an epoch's weights and training records until every actor
                                       scored it (kept with --keep-weights; the same epoch file
                                       raycurv.checkpoints.Recorder writes, and --checkpoints reads)
    <run>/estimators/<name>/           a further estimator's scores and per-epoch table
    <run>/data/                        the prepared dataset of an image folder or Parquet source
    <run>/reference.parquet            a Feldman-Zhang reference estimate (raycurv reference)
    <run>/report/                      raycurv report's figures and gallery
    <run>/rows.json                    a sweep trial's result rows

A run is named after its folder. Writes are atomic (storage.write_bytes): a reader sees the old
file or the whole new one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from raycurv import storage
from raycurv.errors import UsageError
from raycurv.table import BY_EPOCH_SCHEMA, TableError, validate_table

RUN_FILE = "run.json"
SCORES_FILE = "scores.parquet"
BY_EPOCH_FILE = "curvature_by_epoch.parquet"
REFERENCE_FILE = "reference.parquet"
ROWS_FILE = "rows.json"
TRAIN_DIR = "train"
SHARDS_DIR = "shards"
EPOCHS_DIR = "epochs"
ESTIMATORS_DIR = "estimators"
REPORT_DIR = "report"
DATA_DIR = "data"
EPOCH_FILE = "epoch-{epoch:04d}.pt"  # an epoch file's name, in <run>/epochs/ or a Recorder's folder


def run_name(location: str) -> str:
    """A run's name: its folder's (``runs/digits``, ``runs/digits/scores.parquet`` and
    ``s3://bucket/runs/digits`` -> digits); another table file is named by its stem."""
    local = storage.local_path(location)
    text = str(local) if local is not None else str(location).rstrip("/")
    parent, _, last = text.rpartition("/")
    if last == SCORES_FILE:
        return run_name(parent)
    return last.removesuffix(".parquet")


@dataclass(frozen=True)
class RunFolder:
    """A run folder at ``location`` (a local path or a pyarrow URI), and every file in it."""

    location: str

    @classmethod
    def of(cls, run: str) -> RunFolder:
        """The run folder of ``run``: the folder itself, or the folder of its score table file."""
        text = str(run).rstrip("/") or str(run)
        if text.endswith(f"/{SCORES_FILE}") or text == SCORES_FILE:
            return cls(text.rsplit("/", 1)[0] if "/" in text else ".")
        return cls(text)

    @property
    def name(self) -> str:
        return run_name(self.location)

    def path(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    # --- locations ----------------------------------------------------------------------

    @property
    def scores(self) -> str:
        return self.path(SCORES_FILE)

    @property
    def by_epoch(self) -> str:
        return self.path(BY_EPOCH_FILE)

    @property
    def record(self) -> str:
        return self.path(RUN_FILE)

    @property
    def reference(self) -> str:
        return self.path(REFERENCE_FILE)

    @property
    def rows(self) -> str:
        return self.path(ROWS_FILE)

    @property
    def report(self) -> str:
        return self.path(REPORT_DIR)

    @property
    def data(self) -> str:
        """The prepared dataset (raycurv.data.plane.Store) of a data-plane source."""
        return self.path(DATA_DIR)

    @property
    def epochs(self) -> str:
        return self.path(EPOCHS_DIR)

    def train_storage(self) -> str:
        """Where Ray Train keeps checkpoints: ``storage_path`` of its RunConfig (absolute, as
        Ray Train wants it); the run's checkpoints go under ``TRAIN_DIR`` inside it."""
        local = storage.local_path(self.location)
        return str(local) if local is not None else self.location

    def shard_state(self, index: int) -> str:
        """The folder of curvature actor ``index``'s state (see shard_epoch_file)."""
        return self.path(SHARDS_DIR, f"shard-{index:04d}")

    def epoch_weights(self, epoch: int) -> str:
        return epoch_file(self.epochs, epoch)

    def estimator(self, name: str) -> RunFolder:
        """The folder of a further estimator's tables (a sweep's scoring-only axes)."""
        return RunFolder(self.path(ESTIMATORS_DIR, name))

    # --- run.json ---------------------------------------------------------------------------

    def record_location(self) -> str:
        """run.json of this folder; an extra estimator's folder (<run>/estimators/<name>) has none
        of its own and uses its run's."""
        parts = self.location.rstrip("/").split("/")
        if (len(parts) > 2 and parts[-2] == ESTIMATORS_DIR
                and not storage.exists(self.record)):
            return storage.join("/".join(parts[:-2]), RUN_FILE)
        return self.record

    def read_record(self) -> dict[str, Any] | None:
        """run.json (a dict holding ``spec`` with its ``data``), or None when there is none.
        Raises UsageError for a file that does not hold a run spec."""
        raw = storage.read_bytes(self.record_location())
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("spec"), dict)
                and isinstance(record["spec"].get("data"), dict)):
            raise UsageError(f"{self.record_location()} does not hold a run spec")
        return record

    def write_record(self, record: dict[str, Any]) -> None:
        storage.write_bytes(self.record, json.dumps(record, indent=2).encode())

    # --- the score table and the per-epoch table ---------------------------------------------

    def has_scores(self) -> bool:
        return storage.is_file(self.scores)

    def read_scores(self, *, memory_map: bool = True) -> pa.Table:
        """The validated score table. Raises TableError with a one-line reason."""
        table = read_table_file(self.scores, memory_map=memory_map)
        validate_table(table)
        return table

    def write_scores(self, table: pa.Table) -> None:
        """Validate ``table`` against contract v1, then write it atomically."""
        validate_table(table)
        storage.write_parquet(self.scores, table)

    def read_by_epoch(self, *, sample_ids: np.ndarray | None = None) -> pa.Table | None:
        """(sample_id, epoch, curvature) rows of every scored epoch (of ``sample_ids`` only, when
        given), or None when absent."""
        if not storage.is_file(self.by_epoch):
            return None
        filters = None if sample_ids is None else [("sample_id", "in", np.asarray(sample_ids).tolist())]
        return read_table_file(self.by_epoch, columns=BY_EPOCH_SCHEMA.names, filters=filters)

    def iter_by_epoch(self):
        """The per-epoch table's rows as record batches, read as they are consumed (None when
        the run has none): any number of samples and epochs in bounded memory."""
        if not storage.is_file(self.by_epoch):
            return None
        return storage.iter_parquet(self.by_epoch, columns=BY_EPOCH_SCHEMA.names)

    def iter_by_epoch_with_loss(self):
        """(sample_id, epoch, curvature, loss) record batches of the per-epoch table (loss: of the
        model scored at that epoch, null where unrecorded), read as they are consumed; None when
        the run has no per-epoch table or one written before it held the loss."""
        if not storage.is_file(self.by_epoch) or "loss" not in storage.parquet_schema(self.by_epoch).names:
            return None
        return storage.iter_parquet(self.by_epoch, columns=[*BY_EPOCH_SCHEMA.names, "loss"])

    def write_by_epoch(self, table: pa.Table) -> None:
        storage.write_parquet(self.by_epoch, table.cast(BY_EPOCH_SCHEMA))


def epoch_file(folder: str, epoch: int) -> str:
    """Where epoch ``epoch``'s epoch file (weights and training records) lives in ``folder``."""
    return storage.join(folder, EPOCH_FILE.format(epoch=epoch))


def shard_epoch_file(shard_state: str, epoch: int) -> str:
    """Where a shard's record of ``epoch`` lives inside its state folder."""
    return storage.join(shard_state, f"epoch-{epoch:04d}.npz")


def shard_epoch_files(shard_state: str) -> dict[int, str]:
    """Epoch -> location of every epoch a shard has recorded (none when the folder is absent)."""
    out = {}
    for location in storage.list_files(shard_state):
        name = location.rsplit("/", 1)[-1]
        if name.startswith("epoch-") and name.endswith(".npz") and name[6:-4].isdigit():
            out[int(name[6:-4])] = location
    return dict(sorted(out.items()))


def legacy_shard_state(shard_state: str) -> str:
    """The whole state in one file, as earlier versions kept it, beside the folder: shards/shard-KKKK.npz."""
    return f"{shard_state.rstrip('/')}.npz"


def read_table_file(location: str, *, memory_map: bool = True, columns: list[str] | None = None,
                    filters=None) -> pa.Table:
    """A Parquet file at ``location``; TableError (one line) when missing or unreadable."""
    if not storage.is_file(location):
        raise TableError(f"no score table at {location}" if location.endswith(SCORES_FILE)
                         else f"no file at {location}")
    try:
        return storage.read_parquet(location, memory_map=memory_map, columns=columns, filters=filters)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise TableError(f"cannot read {location}: {str(exc).splitlines()[0]}") from None


def read_run_scores(run: str) -> tuple[RunFolder, pa.Table]:
    """(run folder, validated score table) of ``run``, a run folder or its table file, local or
    a URI. A table file under another name is read as it is (its folder is still the run's).
    Raises TableError."""
    file = table_file(run)
    table = read_table_file(file)
    validate_table(table)
    return RunFolder(file.rsplit("/", 1)[0] if "/" in file else "."), table


def table_file(run: str) -> str:
    """The score table file of ``run``: the run itself when it names a Parquet file, else the
    run folder's score table."""
    text = str(run).rstrip("/") or str(run)
    return text if text.endswith(".parquet") else RunFolder(text).scores
