"""Detection metrics: how well a per-sample score finds the samples known to be bad.

The one home of these metrics. ``raycurv evaluate``, the summary ``raycurv score`` prints, the
rows of ``raycurv sweep`` and the lookup service's ``GET /v1/runs/{run}/summary`` all take them
from :func:`evaluate_columns`, so they report the same figures for the same table.

Direction: ``curvature``, ``csl``, ``final_loss`` and ``forgetting_events`` are read as higher =
more memorized = flagged first; ``aum`` and ``margin`` (raycurv.dynamics) as lower = flagged
first, so they are negated here; ``learned_epoch`` as later = flagged first, a sample never
learned for good (null) above every epoch. :func:`flagging_scores` gives each score in that
higher-first form; a NaN or -inf value ranks below every finite one, +inf above. A co-score with
no value for any sample (a table from before contract 1.1) is left out; a sample without a
training record (null aum) ranks last on every co-score.

Targets, named as in the lookup API and after the table's columns:

- ``corrupted``: samples whose label was changed by injected noise (``corrupted`` true), told
  apart from all other samples (clean ones and injected duplicates alike).
- ``duplicate``: injected conflicting duplicates (``duplicate_of`` not null), told apart from the
  clean samples, those neither corrupted nor copies. Samples with a corrupted label are left out
  of this comparison, so label noise neither helps nor hurts finding the duplicates.

Figures of one (target, score) pair, under the lookup API's keys:

- ``positives``: samples of the target within its comparison;
- ``auroc``: area under the ROC curve (scikit-learn): the chance that a random target sample
  scores above a random other one, ties counted half; 0.5 is chance, 1 perfect;
- ``average_precision``: scikit-learn's average precision, the step-wise area under the
  precision-recall curve (tied scores are one threshold); the positive share is chance, 1 perfect;
- ``precision_at_k``: the share of target samples among the k = ``positives`` highest scores,
  ties across the cut taken in row order (the lower position first).

The three are NaN (null in the service's JSON) where the comparison holds a single class.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa

Score = Literal["curvature", "csl", "final_loss", "aum", "margin", "forgetting_events",
                "learned_epoch"]
SCORES: tuple[str, ...] = get_args(Score)
CO_SCORES = SCORES[3:]  # raycurv.dynamics.CO_SCORES; nullable, may be absent (a 1.0 table)
LOWER_FLAGS = ("aum", "margin")  # lower = flagged first
Target = Literal["corrupted", "duplicate"]
Metric = Literal["auroc", "average_precision", "precision_at_k"]
METRICS: tuple[str, ...] = get_args(Metric)


def detection(scores: np.ndarray, positives: np.ndarray, *,
              among: np.ndarray | None = None) -> dict[str, Any]:
    """How well ``scores`` (higher = more likely a target sample) finds ``positives`` (bool),
    among the samples where ``among`` (bool) is true, or all. Returns ``positives`` and the
    METRICS (see the module docstring); NaN where the comparison has a single class."""
    scores = np.asarray(scores)
    positives = np.asarray(positives)
    if scores.ndim != 1 or positives.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be one "
                         "array each of the same length")
    if not np.issubdtype(scores.dtype, np.number) or scores.dtype == np.bool_:
        raise ValueError(f"scores must be numbers, got {scores.dtype}")
    if among is not None:
        among = np.asarray(among, dtype=bool)
        if among.shape != scores.shape:
            raise ValueError(f"among {among.shape} must have the shape of scores {scores.shape}")
        scores, positives = scores[among], positives[among]
    return _detection(scores, positives.astype(bool, copy=False))


def targets(corrupted: np.ndarray, duplicate_of: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each target's (positives, among), bool per sample: its samples, and the samples it is
    told apart from (``corrupted``: all; ``duplicate``: those whose label is not corrupted).

    ``corrupted``: bool per sample; ``duplicate_of``: the copied sample's id, negative or NaN for
    none."""
    corrupted = np.asarray(corrupted)
    duplicate_of = np.asarray(duplicate_of)
    if corrupted.ndim != 1 or duplicate_of.shape != corrupted.shape:
        raise ValueError(f"corrupted {corrupted.shape} and duplicate_of {duplicate_of.shape} "
                         "must be one array each of the same length")
    return _targets(corrupted.astype(bool, copy=False), _is_duplicate(duplicate_of))


def flagging_scores(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The SCORES among ``columns`` (each (N,), as the table stores them; a null count or epoch
    negative or NaN) in higher = flagged first form (see the module docstring), float64 for the
    co-scores, as given for the others. Co-scores with no value at all are left out."""
    present = {name: np.asarray(columns[name]) for name in SCORES if name in columns}
    shapes = {np.shape(values) for values in present.values()}
    if len(shapes) > 1 or any(len(shape) != 1 for shape in shapes):
        raise ValueError(f"scores must be one array each of the same length, got "
                         f"{ {name: np.shape(v) for name, v in present.items()} }")
    return _flagging(present)


def evaluate_columns(columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """Detection metrics of a table's per-sample arrays: ``corrupted`` (bool), ``duplicate_of``
    (int, negative or NaN for none) and the SCORES among ``columns`` (as the table stores them;
    see :func:`flagging_scores` for their direction).

    Returns ``samples``, ``corrupted`` and ``duplicates`` (counts) and ``detection``:
    {target: {score: figures}} for each target with at least one positive (noise or duplicates
    were injected). The service lists the same figures as {target, score, **figures} items."""
    missing = [name for name in ("corrupted", "duplicate_of") if name not in columns]
    if missing:
        raise ValueError(f"missing columns: {', '.join(missing)}")
    corrupted = np.asarray(columns["corrupted"])
    for name in ("duplicate_of", *SCORES):
        if name in columns and np.shape(columns[name]) != corrupted.shape:
            raise ValueError(f"column {name} {np.shape(columns[name])} does not match "
                             f"corrupted {corrupted.shape}")
    return _evaluate(corrupted.astype(bool, copy=False), _is_duplicate(columns["duplicate_of"]),
                     _flagging({s: np.asarray(columns[s]) for s in SCORES if s in columns}))


def evaluate_table(table: pa.Table) -> dict[str, Any]:
    """:func:`evaluate_columns` of a contract-1.x score table (a null duplicate_of is none; the
    co-scores where the table has them)."""
    missing = [name for name in ("corrupted", "duplicate_of", *SCORES)
               if name not in table.column_names and name not in CO_SCORES]
    if missing:
        raise ValueError(f"missing columns: {', '.join(missing)}")
    columns = {name: table.column(name).to_numpy(zero_copy_only=False)
               for name in ("corrupted", *SCORES) if name in table.column_names}
    columns["duplicate_of"] = table.column("duplicate_of").fill_null(-1).to_numpy()
    return evaluate_columns(columns)


def suspected_metrics(columns: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """How right the table's ``suspected`` kinds (raycurv.suspected) are where the truth is known:
    ``columns`` holds ``suspected`` (object, str or None), ``corrupted``, ``duplicate_of`` (int,
    negative or NaN for none) and ``sample_id``, each (N,).

    - ``mislabel`` against injected label noise (``corrupted``);
    - ``conflicting_duplicate`` against the injected conflicting copies and the samples they copy;
    - ``atypical``: no truth; its share of corrupted samples says how much noise it holds.

    Returns {kind: {flagged, precision, recall}} for mislabel and conflicting_duplicate (precision
    None where nothing is flagged, recall None where the truth is empty), and {flagged,
    corrupted_share} for atypical."""
    suspected = np.asarray(columns["suspected"], dtype=object)
    corrupted = np.asarray(columns["corrupted"], dtype=bool)
    copies = _is_duplicate(columns["duplicate_of"])
    sources = np.isin(np.asarray(columns["sample_id"]),
                      np.asarray(columns["duplicate_of"])[copies].astype(np.int64))
    truth = {"mislabel": corrupted, "conflicting_duplicate": copies | sources}
    out = {}
    for kind, known in truth.items():
        flagged = suspected == kind
        hits = int((flagged & known).sum())
        out[kind] = {"flagged": int(flagged.sum()),
                     "precision": hits / int(flagged.sum()) if flagged.any() else None,
                     "recall": hits / int(known.sum()) if known.any() else None}
    atypical = suspected == "atypical"
    out["atypical"] = {"flagged": int(atypical.sum()), "corrupted_share":
                       float(corrupted[atypical].mean()) if atypical.any() else None}
    return out


def detection_items(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``detection`` of :func:`evaluate_columns` as the lookup API lists it: one
    {target, score, positives, auroc, average_precision, precision_at_k} per pair."""
    return [{"target": target, "score": score, **figures}
            for target, by_score in metrics["detection"].items()
            for score, figures in by_score.items()]


def _flagging(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {name: values for name, values in scores.items() if name not in CO_SCORES}
    co = {name: np.asarray(scores[name], dtype=np.float64) for name in CO_SCORES if name in scores}
    if not co:
        return out
    for name in ("forgetting_events", "learned_epoch"):  # null: negative (numpy) or NaN (Arrow)
        if name in co:
            co[name] = np.where(co[name] < 0, np.nan, co[name])
    recorded = ~np.isnan(co["aum"]) if "aum" in co else np.ones(len(next(iter(co.values()))), bool)
    for name, values in co.items():
        if name == "learned_epoch":  # never learned for good: above every epoch
            if not recorded.any():
                continue
            values = np.where(np.isnan(values) & recorded, np.inf, values)
        elif np.isnan(values).all():
            continue
        elif name in LOWER_FLAGS:
            values = -values
        out[name] = values
    return out


def _is_duplicate(duplicate_of: np.ndarray) -> np.ndarray:
    """True where ``duplicate_of`` names a sample (not negative, not NaN)."""
    duplicate_of = np.asarray(duplicate_of)
    if np.issubdtype(duplicate_of.dtype, np.floating):
        return np.nan_to_num(duplicate_of, nan=-1.0) >= 0
    return duplicate_of >= 0


def _targets(corrupted: np.ndarray, is_duplicate: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"corrupted": (corrupted, np.ones_like(corrupted)), "duplicate": (is_duplicate, ~corrupted)}


def _evaluate(corrupted: np.ndarray, is_duplicate: np.ndarray,
              scores: dict[str, np.ndarray]) -> dict[str, Any]:
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for target, (positives, among) in _targets(corrupted, is_duplicate).items():
        every = bool(among.all())  # no copies of the scores when the target is told from all
        if not every:
            positives = positives[among]
        if not positives.any():
            continue
        found[target] = {name: _detection(values if every else values[among], positives)
                         for name, values in scores.items()}
    return {"samples": len(corrupted), "corrupted": int(corrupted.sum()),
            "duplicates": int(is_duplicate.sum()), "detection": found}


def _detection(scores: np.ndarray, positives: np.ndarray) -> dict[str, Any]:
    # scikit-learn is imported here, not with this module: it costs about a second and 100 MB,
    # and the command line's parser and the lookup service import this module at start
    from sklearn.metrics import average_precision_score, roc_auc_score

    k = int(positives.sum())
    if k == 0 or k == len(positives):
        return {"positives": k, **dict.fromkeys(METRICS, float("nan"))}
    scores = _finite_order(scores)
    labels = positives.view(np.int8)  # 0/1 without a copy; scikit-learn is slower on bools
    return {
        "positives": k,
        "auroc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
        "precision_at_k": _precision_at_k(scores, positives, k),
    }


def _finite_order(scores: np.ndarray) -> np.ndarray:
    """float64 scores with the same order and ties, all finite (scikit-learn refuses others):
    with a non-finite score, every score becomes its dense rank, NaN and -inf the lowest."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isfinite(scores).all():
        return scores
    ranks = np.unique(np.where(np.isnan(scores), -np.inf, scores), return_inverse=True)[1]
    return ranks.astype(np.float64)


def _precision_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Share of positives among the ``k`` highest scores (1 <= k <= N), in O(N): every score
    above the k-th highest, then the ties at it in row order."""
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    above = scores > kth
    tied = np.flatnonzero(scores == kth)[: k - int(above.sum())]
    return float((int(positives[above].sum()) + int(positives[tied].sum())) / k)
