"""Agreement of a run's scores with a Feldman-Zhang reference (raycurv.reference): do curvature,
csl, final loss and the training-dynamics co-scores rank the same samples as memorized as the
accepted definition does?

For every score, in raycurv.detection's direction (higher = more memorized: aum and margin
negated; a sample never learned for good one epoch after the latest learned_epoch), against the
reference's mem (higher = more memorized): cosine similarity on all samples and on the top k by
the reference (the paper's measure: 0.87 on CIFAR-100's top 5,000), Pearson and Spearman
correlation, and the top-k overlap (share of the reference's k most memorized samples that are
also among the score's k highest). A co-score is compared on the samples that have it.
Cosine compares magnitudes from zero: it suits the non-negative scores (curvature, csl, loss,
counts, epochs); negated aum and margin change sign, so read their Pearson and Spearman.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics.pairwise import cosine_similarity

from raycurv.detection import SCORES, flagging_scores
from raycurv.errors import UsageError


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(cosine_similarity(a[None, :], b[None, :])[0, 0])


def top_k_count(top_k: float, n: int) -> int:
    """k from ``top_k``: a share of n if in (0, 1), else a count; clipped to [1, n]."""
    if top_k <= 0:
        raise UsageError(f"--top-k must be positive, got {top_k:g}")
    k = int(round(top_k * n)) if top_k < 1 else int(top_k)
    return max(1, min(k, n))


def agreement(score: np.ndarray, reference: np.ndarray, k: int) -> dict[str, float]:
    """Agreement of ``score`` (N,) with ``reference`` (N,), both finite, aligned by sample.

    cosine: over all N; cosine_top_k: over the k samples with the highest reference; pearson,
    spearman: over all N; top_k_overlap: |top k by score & top k by reference| / k (ties broken
    by position). NaN where a vector is constant.
    """
    score = np.asarray(score, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    top_ref = np.argsort(-reference, kind="stable")[:k]
    top_score = np.argsort(-score, kind="stable")[:k]
    constant = np.ptp(score) == 0 or np.ptp(reference) == 0
    return {
        "cosine": _cosine(score, reference),
        "cosine_top_k": _cosine(score[top_ref], reference[top_ref]),
        "pearson": float("nan") if constant else float(pearsonr(score, reference).statistic),
        "spearman": float("nan") if constant else float(spearmanr(score, reference).statistic),
        "top_k_overlap": len(np.intersect1d(top_ref, top_score)) / k,
    }


def join_reference(table: pa.Table, reference: pa.Table) -> dict[str, np.ndarray]:
    """Per-sample arrays for the samples in both tables whose mem is defined: sample_id, mem and
    the score columns the table has (as stored, a null as NaN). The reference must have been
    computed on the labels the run trained on."""
    run = {name: table.column(name).to_numpy(zero_copy_only=False)
           for name in ("sample_id", "label", *SCORES) if name in table.column_names}
    ref_ids = reference.column("sample_id").to_numpy()
    mem = reference.column("mem").to_numpy(zero_copy_only=False).astype(np.float64)
    ref_labels = reference.column("label").to_numpy()
    common, in_run, in_ref = np.intersect1d(run["sample_id"], ref_ids, return_indices=True)
    if not len(common):
        raise UsageError("the reference and the run share no sample_id; was it computed on other data?")
    differ = int((run["label"][in_run] != ref_labels[in_ref]).sum())
    if differ:
        raise UsageError(f"the reference was computed with other labels ({differ} of {len(common)} "
                         "shared samples differ); rerun it with `raycurv reference --from-run RUN`")
    keep = ~np.isnan(mem[in_ref])
    out = {name: values[in_run][keep] for name, values in run.items() if name != "label"}
    out["mem"] = mem[in_ref][keep]
    return out


def evaluate_reference(table: pa.Table, reference: pa.Table, *, top_k: float = 0.1) -> dict[str, Any]:
    """Agreement of every score column of ``table`` with the reference's mem; see ``agreement``."""
    joined = join_reference(table, reference)
    n = len(joined["mem"])
    if n < 2:
        raise UsageError(f"only {n} shared sample(s) with a defined mem; use more reference models")
    k = top_k_count(top_k, n)
    scores = {}
    for name, values in flagging_scores(joined).items():
        has = ~np.isnan(values)
        if has.sum() < 2:
            continue
        finite = values[has & np.isfinite(values)]
        values = np.where(np.isposinf(values), finite.max(initial=0.0) + 1, values)
        scores[name] = agreement(values[has], joined["mem"][has], top_k_count(top_k, int(has.sum())))
        if not has.all():
            scores[name]["samples"] = int(has.sum())
    return {"samples": n, "run_samples": table.num_rows, "k": k, "scores": scores}


def format_agreement(metrics: dict[str, Any]) -> str:
    """A small text table: one row per score."""
    lines = [f"agreement with the reference on {metrics['samples']} samples (top k = {metrics['k']})",
             f"{'':<22}{'cos':>8}{'cos@k':>8}{'pearson':>9}{'spearman':>9}{'overlap@k':>10}"]
    for score, m in metrics["scores"].items():
        lines.append(f"  {score:<20}{m['cosine']:>8.4f}{m['cosine_top_k']:>8.4f}{m['pearson']:>9.4f}"
                     f"{m['spearman']:>9.4f}{m['top_k_overlap']:>10.4f}")
    return "\n".join(lines)
