"""Detection metrics of a score table: how well curvature (and csl, final loss) find the samples
whose labels were corrupted, or the injected conflicting duplicates. Higher score = flagged first."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.metrics import average_precision_score, roc_auc_score

from raycurv.errors import UsageError
from raycurv.runfolder import BY_EPOCH_FILE, RunFolder, read_run_scores
from raycurv.table import TableError

SCORES = ("curvature", "csl", "final_loss")


def precision_at_k(scores: np.ndarray, target: np.ndarray, k: int) -> float:
    """Share of true targets among the k highest scores (ties broken by position)."""
    if k <= 0:
        return float("nan")
    top = np.argsort(-scores, kind="stable")[:k]
    return float(target[top].mean())


def detection(scores: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """AUROC, average precision and precision@k (k = number of targets) of ``scores`` for
    ``target`` (bool). NaN where the target has a single class."""
    target = np.asarray(target, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if target.all() or not target.any():
        return {"auroc": float("nan"), "ap": float("nan"), "precision_at_k": float("nan"), "k": int(target.sum())}
    k = int(target.sum())
    return {
        "auroc": float(roc_auc_score(target, scores)),
        "ap": float(average_precision_score(target, scores)),
        "precision_at_k": precision_at_k(scores, target, k),
        "k": k,
    }


def evaluate_columns(columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """Detection metrics from per-sample arrays: ``corrupted`` (bool), ``duplicate_of`` (int,
    -1 or NaN for none) and the score columns. Mislabels are told from all other samples;
    injected duplicates from the clean samples (neither corrupted nor copies)."""
    corrupted = np.asarray(columns["corrupted"], dtype=bool)
    dup = np.asarray(columns["duplicate_of"], dtype=np.float64)
    is_dup = np.nan_to_num(dup, nan=-1) >= 0
    out: dict[str, Any] = {"samples": int(len(corrupted)), "corrupted": int(corrupted.sum()),
                           "duplicates": int(is_dup.sum())}
    present = [s for s in SCORES if s in columns]
    if corrupted.any():
        out["mislabel"] = {s: detection(columns[s], corrupted) for s in present}
    if is_dup.any():
        clean = ~corrupted
        out["duplicate"] = {s: detection(np.asarray(columns[s])[clean], is_dup[clean]) for s in present}
    return out


def evaluate_table(table: pa.Table) -> dict[str, Any]:
    columns = {name: table.column(name).to_numpy(zero_copy_only=False)
               for name in ("corrupted", "duplicate_of", *SCORES)}
    columns["duplicate_of"] = table.column("duplicate_of").fill_null(-1).to_numpy()
    return evaluate_columns(columns)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A small text table: one row per (target, score)."""
    lines = [f"samples {metrics['samples']}, corrupted labels {metrics['corrupted']}, "
             f"injected duplicates {metrics['duplicates']}"]
    for target in ("mislabel", "duplicate"):
        if target not in metrics:
            continue
        lines.append(f"{'finding ' + target + 's':<22}{'AUROC':>8}{'AP':>8}{'P@k':>8}")
        for score, m in metrics[target].items():
            lines.append(f"  {score:<20}{m['auroc']:>8.4f}{m['ap']:>8.4f}{m['precision_at_k']:>8.4f}")
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


def epoch_window(by_epoch: pa.Table, sample_ids: np.ndarray, start: int,
                 stop: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-epoch curvature over the scored epochs in [start, stop), per sample.

    by_epoch: (sample_id, epoch, curvature) rows; sample_ids: (N,). Returns the mean (N,) float64
    (higher = more memorized) and the number of epochs averaged (N,) int. UsageError when the
    window holds no scored epoch for some sample.
    """
    epoch = by_epoch.column("epoch").to_numpy()
    inside = (epoch >= start) & (epoch < (stop if stop is not None else np.iinfo(np.int64).max))
    ids = by_epoch.column("sample_id").to_numpy()[inside]
    values = by_epoch.column("curvature").to_numpy()[inside].astype(np.float64)
    pos = np.searchsorted(sample_ids, ids)
    pos = np.clip(pos, 0, len(sample_ids) - 1)
    known = sample_ids[pos] == ids
    sums = np.bincount(pos[known], weights=values[known], minlength=len(sample_ids))
    counts = np.bincount(pos[known], minlength=len(sample_ids))
    if not counts.all():
        scored = sorted(set(epoch.tolist()))
        have = f"{scored[0]}..{scored[-1]}" if scored else "none"
        raise UsageError(f"epochs {start}:{'' if stop is None else stop} hold no scored epoch for "
                         f"{int((counts == 0).sum())} samples; scored epochs: {have}")
    return sums / counts, counts


def with_curvature(table: pa.Table, curvature: np.ndarray, epochs_scored: np.ndarray) -> pa.Table:
    """``table`` with curvature, epochs_scored, rank and percentile replaced (same schema)."""
    from raycurv.table import rank_and_percentile

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
    try:
        by_epoch = folder.read_by_epoch()
    except TableError as exc:
        raise UsageError(str(exc)) from None
    if by_epoch is None:
        raise UsageError(f"no {BY_EPOCH_FILE} in {folder.location}: --epochs needs the per-epoch "
                         "curvature")
    mean, counts = epoch_window(by_epoch, table.column("sample_id").to_numpy(), start, stop)
    return with_curvature(table, mean, counts)


# --- duplicate groups found in the images -------------------------------------------------

def percentiles(scores: np.ndarray) -> np.ndarray:
    """(N,) share of samples with a strictly lower score, in [0, 1] (as the table's percentile)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.searchsorted(np.sort(scores), scores, side="left") / max(len(scores), 1)


def _group_ranking(groups: list, pct: np.ndarray, top_share: float) -> dict[str, float]:
    members = np.concatenate([g.members for g in groups])
    top = pct >= 1 - top_share
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
    pct = {s: percentiles(columns[s]) for s in SCORES if s in columns}
    if conflicting:
        out["ranking"] = {s: _group_ranking(conflicting, p, top_share) for s, p in pct.items()}
    dup_of = np.asarray(columns["duplicate_of"])
    if (dup_of >= 0).any():
        out["injected"] = _injected_found(dups.group, np.asarray(columns["sample_id"]), dup_of)
    rank = np.argsort(np.argsort(-np.asarray(columns["curvature"]), kind="stable"), kind="stable") + 1
    by_rank = sorted(conflicting, key=lambda g: int(rank[g.members].min()))[:listed]
    out["conflicting"] = [{"group": g.id, "kind": g.kind,
                           "sample_ids": [int(columns["sample_id"][m]) for m in g.members],
                           "labels": [int(v) for v in g.labels],
                           "curvature_ranks": [int(rank[m]) for m in g.members]} for g in by_rank]
    return out


# --- a stored run, end to end ---------------------------------------------------------------

def table_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """The per-sample arrays evaluation uses (duplicate_of: -1 for none)."""
    cols = {name: table.column(name).to_numpy(zero_copy_only=False)
            for name in ("sample_id", "label", "original_label", "corrupted", *SCORES)}
    cols["duplicate_of"] = table.column("duplicate_of").fill_null(-1).to_numpy()
    return cols


def find_run_duplicates(folder: RunFolder, table: pa.Table, threshold: float):
    """Exact and near duplicate groups among the run's images (prepared again from the run's record)."""
    from raycurv.duplicates import find_duplicates  # torch: only where duplicates are searched
    from raycurv.rundata import load_run_data

    data = load_run_data(folder, table)
    return find_duplicates(data.images, data.labels, scale=data.norm.scale, threshold=threshold)


def load_run_table(run: str, epochs: str | None = None) -> tuple[RunFolder, pa.Table]:
    """(run folder, score table) of ``run`` (a folder or its table file, local or a URI); with
    ``epochs`` 'A:B', curvature is the mean over epochs A..B-1. Bad input raises UsageError."""
    try:
        folder, table = read_run_scores(run)
    except TableError as exc:
        raise UsageError(str(exc)) from None
    if epochs is not None:
        table = read_epoch_window(folder, table, epochs)
    return folder, table


def collect_metrics(table: pa.Table, *, reference: pa.Table | None = None, top_k: float = 0.1,
                    dups=None, epochs: str | None = None) -> dict[str, Any]:
    """Detection metrics of ``table``, plus agreement with ``reference`` and duplicate-group
    metrics of ``dups`` (raycurv.duplicates.Duplicates) where given."""
    metrics = evaluate_table(table)
    if epochs is not None:
        metrics["epochs"] = epochs
    if reference is not None:
        from raycurv.agreement import evaluate_reference

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
    from raycurv.reference import read_reference

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
    from raycurv.agreement import format_agreement

    parts = []
    if "epochs" in metrics:
        parts.append(f"curvature: mean over epochs {metrics['epochs']}")
    parts.append(format_metrics(metrics))
    if "agreement" in metrics:
        parts.append(format_agreement(metrics["agreement"]))
    if "duplicate_groups" in metrics:
        parts.append(format_duplicates(metrics["duplicate_groups"]))
    return "\n".join(parts)
