"""Detection metrics of a score table: how well curvature (and csl, final loss) find the samples
whose labels were corrupted, or the injected conflicting duplicates. Higher score = flagged first."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.metrics import average_precision_score, roc_auc_score

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
