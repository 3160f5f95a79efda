"""Metrics of a stored run: detection (raycurv.detection: how well curvature, csl, final loss and
the training-dynamics co-scores find the corrupted labels and the injected conflicting
duplicates), agreement with a reference, duplicate groups in the images, an epoch window of the
curvature. Each score is read in raycurv.detection's direction (flagging_scores: aum and margin
negated, never learned above every epoch), higher = flagged first."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raycurv.detection import SCORES, evaluate_table, flagging_scores, suspected_metrics
from raycurv.errors import UsageError
from raycurv.rundata import load_run_data
from raycurv.runfolder import BY_EPOCH_FILE, RunFolder, read_run_scores
from raycurv.table import (
    TableError,
    has_training_records,
    rank_and_percentile,
    read_metadata,
    with_optional_columns,
)

TARGET_TITLES = {"corrupted": "corrupted labels", "duplicate": "duplicates vs clean"}


def format_metrics(metrics: dict[str, Any]) -> str:
    """The detection metrics of raycurv.detection.evaluate_table as a small text table: one row
    per (target, score); AP = average precision, P@k = precision among the k highest scores,
    k = the target's positives (higher = better for all three)."""
    lines = [f"samples {metrics['samples']}, corrupted labels {metrics['corrupted']}, "
             f"injected duplicates {metrics['duplicates']}"]
    for target, by_score in metrics["detection"].items():
        k = next(iter(by_score.values()))["positives"] if by_score else 0
        lines.append(f"{f'finding {TARGET_TITLES[target]}, k = {k}':<40}{'AUROC':>8}{'AP':>8}{'P@k':>8}")
        for score, m in by_score.items():
            lines.append(f"  {score:<38}{m['auroc']:>8.4f}{m['average_precision']:>8.4f}"
                         f"{m['precision_at_k']:>8.4f}")
    return "\n".join(lines)


# --- an epoch window of the per-epoch curvature -------------------------------------------

def parse_epochs(text: str) -> tuple[int, int | None]:
    """'A:B' -> (A, B): epochs A..B-1; 'A:' -> (A, None) up to the last; ':B' -> (0, B)."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0].strip() else 0
        stop = int(parts[1]) if parts[1].strip() else None
    except ValueError:
        raise UsageError(f"--epochs must look like A:B (epochs A..B-1), got {text!r}") from None
    if start < 0 or (stop is not None and stop <= start):
        raise UsageError(f"--epochs {text}: need 0 <= A < B")
    return start, stop


def epoch_window(by_epoch, sample_ids: np.ndarray, start: int,
                 stop: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-epoch curvature over the scored epochs in [start, stop), per sample.

    by_epoch: (sample_id, epoch, curvature) rows, a table or an iterable of record batches (read
    as they come: memory for one batch and the (N,) sums); sample_ids: (N,) increasing. Returns
    the mean (N,) float64 (higher = more memorized) and the number of epochs averaged (N,) int.
    UsageError when the window holds no scored epoch for some sample.
    """
    batches = by_epoch.to_batches() if isinstance(by_epoch, pa.Table) else by_epoch
    sums = np.zeros(len(sample_ids))
    counts = np.zeros(len(sample_ids), dtype=np.int64)
    scored: set[int] = set()
    last = stop if stop is not None else np.iinfo(np.int64).max
    for batch in batches:
        epoch = batch.column("epoch").to_numpy()
        scored.update(np.unique(epoch).tolist())
        inside = (epoch >= start) & (epoch < last)
        ids = batch.column("sample_id").to_numpy()[inside]
        values = batch.column("curvature").to_numpy()[inside].astype(np.float64)
        pos = np.clip(np.searchsorted(sample_ids, ids), 0, max(len(sample_ids) - 1, 0))
        known = sample_ids[pos] == ids
        sums += np.bincount(pos[known], weights=values[known], minlength=len(sample_ids))
        counts += np.bincount(pos[known], minlength=len(sample_ids))
    if not counts.all():
        have = f"{min(scored)}..{max(scored)}" if scored else "none"
        raise UsageError(f"epochs {start}:{'' if stop is None else stop} hold no scored epoch for "
                         f"{int((counts == 0).sum())} samples; scored epochs: {have}")
    return sums / counts, counts


def with_curvature(table: pa.Table, curvature: np.ndarray, epochs_scored: np.ndarray) -> pa.Table:
    """``table`` with curvature, epochs_scored, rank and percentile replaced (same schema)."""
    rank, percentile = rank_and_percentile(curvature)
    for name, values in (("curvature", curvature), ("epochs_scored", epochs_scored),
                         ("rank", rank), ("percentile", percentile)):
        field = table.schema.field(name)
        index = table.schema.get_field_index(name)
        table = table.set_column(index, field, pa.array(np.asarray(values).astype(
            field.type.to_pandas_dtype())))
    return table


def read_epoch_window(folder: RunFolder, table: pa.Table, epochs: str) -> pa.Table:
    """``table`` scored by the mean curvature of the epoch window ``epochs`` ('A:B')."""
    start, stop = parse_epochs(epochs)
    by_epoch = folder.iter_by_epoch()
    if by_epoch is None:
        raise UsageError(f"no {BY_EPOCH_FILE} in {folder.location}: --epochs needs the per-epoch "
                         "curvature")
    try:
        mean, counts = epoch_window(by_epoch, table.column("sample_id").to_numpy(), start, stop)
    except (OSError, pa.ArrowException) as exc:  # a damaged file: one line
        raise UsageError(f"cannot read {folder.by_epoch}: {str(exc).splitlines()[0]}") from None
    return with_curvature(table, mean, counts)


# --- duplicate groups found in the images -------------------------------------------------

def _group_ranking(groups: list, pct: np.ndarray, top_share: float) -> dict[str, float]:
    members = np.concatenate([g.members for g in groups])
    top = pct >= pct.dtype.type(1 - top_share)  # in the percentile's own precision (float32)
    return {"median_percentile": float(np.median(pct[members])),
            "members_in_top": float(top[members].mean()),
            "groups_with_member_in_top": float(np.mean([top[g.members].any() for g in groups]))}


def _injected_found(group: np.ndarray, sample_ids: np.ndarray, duplicate_of: np.ndarray) -> dict:
    copies = np.flatnonzero(duplicate_of >= 0)
    sources = np.searchsorted(sample_ids, duplicate_of[copies])
    found = (group[copies] >= 0) & (group[copies] == group[sources])
    return {"copies": int(len(copies)), "found": float(found.mean())}


def duplicate_metrics(dups, columns: dict[str, np.ndarray], *, top_share: float = 0.1,
                      listed: int = 20) -> dict[str, Any]:
    """How the groups of ``dups`` (raycurv.duplicates.Duplicates, positions aligned with
    ``columns``: sample_id, label, duplicate_of (-1 none) and the scores) rank under each score.

    For the conflicting groups (labels disagree), per score: the median percentile of their
    members, the share of members in the top ``top_share`` of the score, and the share of groups
    with at least one member there. ``injected``: share of injected copies found in their
    source's group. ``conflicting``: the ``listed`` groups with the highest curvature.
    """
    conflicting = dups.conflicting
    out: dict[str, Any] = {
        "threshold": dups.threshold, "groups": len(dups.groups),
        "exact_groups": sum(g.kind == "exact" for g in dups.groups),
        "near_groups": sum(g.kind == "near" for g in dups.groups),
        "samples_in_groups": int((dups.group >= 0).sum()),
        "conflicting_groups": len(conflicting),
        "samples_in_conflicting": int(sum(len(g.members) for g in conflicting)),
        "top_share": top_share,
    }
    ranked = {s: rank_and_percentile(np.where(np.isnan(values), -np.inf, values))
              for s, values in flagging_scores(columns).items()}
    pct = {s: percentile for s, (_, percentile) in ranked.items()}
    if conflicting:
        out["ranking"] = {s: _group_ranking(conflicting, p, top_share) for s, p in pct.items()}
    dup_of = np.asarray(columns["duplicate_of"])
    if (dup_of >= 0).any():
        out["injected"] = _injected_found(dups.group, np.asarray(columns["sample_id"]), dup_of)
    rank = ranked["curvature"][0]
    by_rank = sorted(conflicting, key=lambda g: int(rank[g.members].min()))[:listed]
    out["conflicting"] = [{"group": g.id, "kind": g.kind,
                           "sample_ids": [int(columns["sample_id"][m]) for m in g.members],
                           "labels": [int(v) for v in g.labels],
                           "curvature_ranks": [int(rank[m]) for m in g.members]} for g in by_rank]
    return out


# --- a stored run, end to end ---------------------------------------------------------------

def table_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """The per-sample arrays evaluation uses (duplicate_of: -1 for none; the co-scores as
    stored, a null as NaN, where the table has them)."""
    cols = {name: table.column(name).to_numpy(zero_copy_only=False)
            for name in ("sample_id", "label", "original_label", "corrupted", *SCORES)
            if name in table.column_names}
    cols["duplicate_of"] = table.column("duplicate_of").fill_null(-1).to_numpy()
    return cols


def find_run_duplicates(folder: RunFolder, table: pa.Table, threshold: float):
    """Exact and near duplicate groups among the run's images (prepared again from the run's record)."""
    from raycurv.data.plane import StoreImages
    from raycurv.duplicates import find_duplicates  # torch and a nearest-neighbour index: only here

    data = load_run_data(folder, table)
    images = data.images if data.images is not None else StoreImages(data.store, 0, len(data))
    return find_duplicates(images, data.labels, scale=data.norm.scale, threshold=threshold)


def load_run_table(run: str, epochs: str | None = None) -> tuple[RunFolder, pa.Table]:
    """(run folder, score table) of ``run`` (a folder or its table file, local or a URI); with
    ``epochs`` 'A:B', curvature is the mean over epochs A..B-1. A 1.0 table gets the 1.1
    co-score columns, all null. Bad input raises UsageError."""
    try:
        folder, table = read_run_scores(run)
    except TableError as exc:
        raise UsageError(str(exc)) from None
    table = with_optional_columns(table)
    if epochs is not None:
        table = read_epoch_window(folder, table, epochs)
    return folder, table


def collect_metrics(table: pa.Table, *, reference: pa.Table | None = None, top_k: float = 0.1,
                    dups=None, epochs: str | None = None) -> dict[str, Any]:
    """Detection metrics of ``table``, plus agreement with ``reference`` and duplicate-group
    metrics of ``dups`` (raycurv.duplicates.Duplicates) where given."""
    metrics = evaluate_table(table)
    if not has_training_records(read_metadata(table)):  # scored checkpoints: csl is 0
        for by_score in metrics["detection"].values():
            by_score.pop("csl", None)
    if "suspected" in table.column_names and table.column("suspected").null_count < table.num_rows:
        metrics["suspected"] = suspected_metrics(table_columns(table) | {
            "suspected": table.column("suspected").to_numpy(zero_copy_only=False)})
    if epochs is not None:
        metrics["epochs"] = epochs
    if reference is not None:
        from raycurv.agreement import evaluate_reference  # scipy: only with a reference

        metrics["agreement"] = evaluate_reference(table, reference, top_k=top_k)
    if dups is not None:
        metrics["duplicate_groups"] = duplicate_metrics(dups, table_columns(table))
    return metrics


def evaluate_run(run: str, *, reference: str | None = None, top_k: float = 0.1,
                 epochs: str | None = None, duplicates: bool = True,
                 threshold: float | None = None) -> dict[str, Any]:
    """All metrics of a stored run: detection (mislabels, injected duplicates), agreement with a
    reference table, duplicate groups in the images. ``epochs`` 'A:B' scores by the mean
    curvature of epochs A..B-1 instead of all scored epochs. Bad input raises UsageError."""
    from raycurv.duplicates import NEAR_THRESHOLD
    from raycurv.reference import read_reference  # torch and Ray: only with a reference

    folder, table = load_run_table(run, epochs)
    ref = read_reference(reference)[0] if reference is not None else None
    dups = None
    if duplicates:
        dups = find_run_duplicates(folder, table, NEAR_THRESHOLD if threshold is None else threshold)
    return collect_metrics(table, reference=ref, top_k=top_k, dups=dups, epochs=epochs)


def format_duplicates(d: dict[str, Any]) -> str:
    lines = [f"duplicate groups (near threshold {d['threshold']:g}): {d['groups']} "
             f"({d['exact_groups']} exact, {d['near_groups']} near), {d['samples_in_groups']} samples; "
             f"{d['conflicting_groups']} with conflicting labels ({d['samples_in_conflicting']} samples)"]
    if "injected" in d:
        lines.append(f"  injected copies found in their source's group: {d['injected']['found']:.4f} "
                     f"of {d['injected']['copies']}")
    if "ranking" in d:
        share = f"top {d['top_share']:.0%}"
        lines.append(f"{'conflicting groups':<22}{'med pct':>9}{'in ' + share:>12}{'groups in ' + share:>18}")
        for score, r in d["ranking"].items():
            lines.append(f"  {score:<20}{r['median_percentile']:>9.4f}{r['members_in_top']:>12.4f}"
                         f"{r['groups_with_member_in_top']:>18.4f}")
    for g in d["conflicting"][:5]:
        lines.append(f"  group {g['group']} ({g['kind']}): samples {g['sample_ids']} labels {g['labels']} "
                     f"curvature ranks {g['curvature_ranks']}")
    return "\n".join(lines)


def format_run(metrics: dict[str, Any]) -> str:
    """Detection, agreement and duplicate sections as text."""
    from raycurv.agreement import format_agreement  # scipy: only with a reference

    parts = []
    if "epochs" in metrics:
        parts.append(f"curvature: mean over epochs {metrics['epochs']}")
    parts.append(format_metrics(metrics))
    if "agreement" in metrics:
        parts.append(format_agreement(metrics["agreement"]))
    if "suspected" in metrics:
        parts.append(format_suspected(metrics["suspected"]))
    if "duplicate_groups" in metrics:
        parts.append(format_duplicates(metrics["duplicate_groups"]))
    return "\n".join(parts)


def format_suspected(found: dict[str, dict[str, Any]]) -> str:
    """raycurv.detection.suspected_metrics as text: per kind, how many, and where the truth is
    known (injected noise and copies) precision and recall; for atypical, the corrupted share."""
    def cell(value: float | None) -> str:
        return f"{value:>8.4f}" if value is not None else f"{'-':>8}"

    lines = [f"{'suspected (rule: the table metadata)':<40}{'flagged':>8}{'prec.':>8}{'recall':>8}"]
    for kind in ("mislabel", "conflicting_duplicate"):
        m = found[kind]
        lines.append(f"  {kind:<38}{m['flagged']:>8}{cell(m['precision'])}{cell(m['recall'])}")
    m = found["atypical"]
    lines.append(f"  {'atypical (share corrupted)':<38}{m['flagged']:>8}{cell(m['corrupted_share'])}")
    return "\n".join(lines)
