"""A run's scores in the layouts other tools read: a flat table (CSV, JSON Lines), cleanlab's
label-issues table, and a FiftyOne image-classification dataset.

Every layout is built from one per-sample table (:func:`export_table`): the score table's
columns (``curvature``: higher = more memorized; ``rank`` 1 = highest; ``percentile`` in [0, 1])
plus ``path`` (the sample's source file or Parquet row, where the run has one: a data-plane run's
prepared dataset records it; null for built-in datasets) and the class names of ``label`` and
``final_pred`` (null where the run has none).

cleanlab's layout flags a label issue by the rule :data:`ISSUE_RULE`: a sample whose
``suspected`` kind (raycurv.suspected, with the export's ``threshold``, default 0.9) is
``mislabel`` (in the top ``1 - threshold`` share by the mislabel score, csl, and the final model
predicts another class than its label) or ``conflicting_duplicate`` (as the table records it);
``label_score`` is ``1 -`` the mislabel score's percentile (cleanlab's direction: lower = more
likely a label issue).

Files are written through raycurv.storage (a local path or a URI), each atomically.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from raycurv import storage
from raycurv.class_names import class_names
from raycurv.data import plane
from raycurv.errors import UsageError
from raycurv.runfolder import RunFolder
from raycurv.suspected import CONFLICTING_DUPLICATE, MISLABEL, mislabel_score, suspect
from raycurv.suspected import (
    DEFAULT_THRESHOLD as DEFAULT_THRESHOLD,  # the export's default: the rule's
)
from raycurv.table import has_training_records, read_metadata

EXPORTS_DIR = "exports"  # under the run folder: where an export goes unless told otherwise
ISSUE_RULE = ("is_label_issue = suspected is mislabel (the mislabel score's percentile >= "
              "threshold, default 0.9: the top 10 % by csl, or by final_loss without training "
              "records, and final_pred != label) or conflicting_duplicate; label_score = 1 - the "
              "mislabel score's percentile")
IMAGE_SUFFIXES = plane.IMAGE_SUFFIXES
FIFTYONE_LABELS = "labels.json"  # the given labels: FiftyOneImageClassificationDataset
FIFTYONE_PREDICTIONS = "predictions.json"  # the final model's predictions, the same layout
FIFTYONE_DATA = "data.json"  # manifest: sample_id -> image file
FIFTYONE_MEDIA = "data"  # PNGs of the samples of a run without image files
FIFTYONE_SCORES = "scores.jsonl"  # every sample's scores, to set as fields


def sample_paths(folder: RunFolder, sample_ids: np.ndarray) -> pa.Array:
    """Each sample's source (``path`` of the run's prepared dataset), null where the run has none."""
    store = plane.Store.open(folder.data)
    if store is None:
        return pa.nulls(len(sample_ids), pa.string())
    rows = store.read_rows(0, len(store), columns=("sample_id", "path"))
    order = np.argsort(rows["sample_id"])
    ids = rows["sample_id"][order]
    pos = np.clip(np.searchsorted(ids, sample_ids), 0, max(len(ids) - 1, 0))
    known = (ids[pos] == sample_ids) if len(ids) else np.zeros(len(sample_ids), bool)
    paths = rows["path"][order][pos] if len(ids) else np.full(len(sample_ids), None)
    return pa.array([p if k else None for p, k in zip(paths, known, strict=True)], pa.string())


def _names(labels: pa.ChunkedArray, names: tuple[str, ...] | None) -> pa.Array:
    if names is None:
        return pa.nulls(len(labels), pa.string())
    values = labels.to_numpy()
    return pa.array([names[v] if 0 <= v < len(names) else None for v in values], pa.string())


def export_table(folder: RunFolder, table: pa.Table) -> pa.Table:
    """The score table with ``path`` after ``sample_id``, and ``label_name`` and ``final_pred_name``
    (class names, null where the run has none) at the end."""
    names = class_names(read_metadata(table))
    out = table.add_column(1, "path", sample_paths(folder, table.column("sample_id").to_numpy()))
    out = out.append_column("label_name", _names(table.column("label"), names))
    return out.append_column("final_pred_name", _names(table.column("final_pred"), names))


def cleanlab_table(table: pa.Table, *, threshold: float) -> pa.Table:
    """cleanlab's label-issues layout (``Datalab.get_issues("label")``): ``is_label_issue`` (bool),
    ``label_score`` (float64, lower = more likely an issue), ``given_label``, ``predicted_label``
    (int64), after ``sample_id``; see :data:`ISSUE_RULE`."""
    recorded = (table.column("suspected").to_numpy(zero_copy_only=False)
                if "suspected" in table.column_names else None)
    _, mislabel = mislabel_score(
        {name: table.column(name).to_numpy() for name in ("csl", "final_loss")},
        training_records=has_training_records(read_metadata(table)))
    kinds = suspect(percentile=table.column("percentile").to_numpy(), mislabel_percentile=mislabel,
                    label=table.column("label").to_numpy(),
                    final_pred=table.column("final_pred").to_numpy(),
                    conflicting=None if recorded is None else recorded == CONFLICTING_DUPLICATE,
                    threshold=threshold)
    return pa.table({
        "sample_id": table.column("sample_id"),
        "is_label_issue": pa.array((kinds == MISLABEL) | (kinds == CONFLICTING_DUPLICATE)),
        "label_score": pa.array(1.0 - mislabel.astype(np.float64)),
        "given_label": table.column("label").cast(pa.int64()),
        "predicted_label": table.column("final_pred").cast(pa.int64()),
    })


def _csv_bytes(table: pa.Table) -> bytes:
    out = io.BytesIO()
    pacsv.write_csv(table, out)
    return out.getvalue()


def _jsonl_bytes(table: pa.Table) -> bytes:
    def clean(value: Any) -> Any:  # NaN is not JSON: null
        return None if isinstance(value, float) and not np.isfinite(value) else value

    lines = (json.dumps({k: clean(v) for k, v in row.items()}) for row in table.to_pylist())
    return "".join(f"{line}\n" for line in lines).encode()


@dataclass(frozen=True)
class Export:
    """What an export needs: the run's folder, its export table, and the issue threshold."""

    folder: RunFolder
    table: pa.Table
    threshold: float


def _write_csv(export: Export, output: str) -> None:
    storage.write_bytes(output, _csv_bytes(export.table))


def _write_jsonl(export: Export, output: str) -> None:
    storage.write_bytes(output, _jsonl_bytes(export.table))


def _write_cleanlab(export: Export, output: str) -> None:
    storage.write_bytes(output, _csv_bytes(cleanlab_table(export.table, threshold=export.threshold)))


def _classification_labels(table: pa.Table, column: str, names: tuple[str, ...] | None,
                           confidence: str | None = None) -> dict[str, Any]:
    """FiftyOneImageClassificationDataset's labels file: ``classes`` (the class names, or the
    labels as strings) and ``labels``: sample_id -> class index, or {label, confidence}."""
    classes = list(names) if names is not None else None
    ids = table.column("sample_id").to_pylist()
    values = table.column(column).to_pylist()
    if confidence is None:
        labels = dict(zip(map(str, ids), values, strict=True))
    else:
        confidences = table.column(confidence).to_pylist()
        labels = {str(i): {"label": v, "confidence": c}
                  for i, v, c in zip(ids, values, confidences, strict=True)}
    if classes is None:  # labels as strings: the run's classes, else as many as the labels used
        count = read_metadata(table).get("classes")
        if not isinstance(count, int):
            count = 1 + int(max(table.column("label").to_numpy().max(initial=0),
                                table.column("final_pred").to_numpy().max(initial=0)))
        classes = [str(k) for k in range(count)]
    return {"classes": classes, "labels": labels}


def _media(export: Export, output: str) -> dict[str, str]:
    """sample_id -> image file: the run's own files where every path is an image file, else PNGs
    of the run's images written under ``output``/data."""
    from raycurv.serve.images import load_images  # the run's pixels: only without image files

    table = export.table
    paths = table.column("path").to_pylist()
    ids = [str(i) for i in table.column("sample_id").to_pylist()]
    if all(p is not None and p.lower().endswith(IMAGE_SUFFIXES) for p in paths):
        return dict(zip(ids, paths, strict=True))
    images = load_images(export.folder, table.column("sample_id").to_numpy(),
                         table.column("label").to_numpy())
    media = {}
    for position, sample_id in enumerate(ids):
        location = storage.join(output, FIFTYONE_MEDIA, f"{sample_id}.png")
        storage.write_bytes(location, images.png(position))
        local = storage.local_path(location)
        media[sample_id] = str(local.resolve()) if local is not None else location
    return media


def _write_fiftyone(export: Export, output: str) -> None:
    """A FiftyOneImageClassificationDataset folder: data.json (sample_id -> image), labels.json
    (the given labels), predictions.json (the final model's, with confidence) and scores.jsonl
    (every column of the export table, one sample a line). labels.json is written last."""
    table = export.table
    names = class_names(read_metadata(table))
    media = _media(export, output)
    storage.write_bytes(storage.join(output, FIFTYONE_DATA), json.dumps(media).encode())
    storage.write_bytes(storage.join(output, FIFTYONE_SCORES), _jsonl_bytes(table))
    predictions = _classification_labels(table, "final_pred", names, confidence="final_confidence")
    storage.write_bytes(storage.join(output, FIFTYONE_PREDICTIONS), json.dumps(predictions).encode())
    labels = _classification_labels(table, "label", names)
    storage.write_bytes(storage.join(output, FIFTYONE_LABELS), json.dumps(labels).encode())


# format -> (writer, default output name under <run>/exports)
FORMATS: dict[str, tuple[Callable[[Export, str], None], str]] = {
    "csv": (_write_csv, "scores.csv"),
    "jsonl": (_write_jsonl, "scores.jsonl"),
    "cleanlab": (_write_cleanlab, "cleanlab_label_issues.csv"),
    "fiftyone": (_write_fiftyone, "fiftyone"),
}


def default_output(folder: RunFolder, format: str) -> str:
    """Where an export goes unless told: ``<run>/exports/<name>``."""
    return folder.path(EXPORTS_DIR, FORMATS[format][1])


def write_export(folder: RunFolder, table: pa.Table, *, format: str, output: str | None,
                 threshold: float) -> str:
    """Write ``table`` (a validated score table of the run in ``folder``) as ``format`` to
    ``output`` (default :func:`default_output`); returns where. ValueError for an unknown format."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    writer, _ = FORMATS[format]
    output = output or default_output(folder, format)
    storage.check_writable_folder(output if format == "fiftyone" else _parent(output))
    if storage.is_dir(output) and format != "fiftyone":
        raise UsageError(f"{output} is a folder: give a file name for the {format} export")
    writer(Export(folder, export_table(folder, table), threshold), output)
    return output


def _parent(location: str) -> str:
    text = str(location).rstrip("/")
    return text.rsplit("/", 1)[0] if "/" in text else "."
