"""What to do about a sample: the score table's ``suspected`` column (contract 1.2).

A sample is suspected where it stands out, of one kind, the first that applies:

- ``conflicting_duplicate``: it belongs to a group of exact or near-duplicate images
  (raycurv.duplicates) whose labels disagree: the same picture carrying two labels, which a
  network can fit only by memorizing one of them. Relabel the group, or keep one image.
- ``mislabel``: its mislabel score is in the top ``1 - threshold`` share (that score's
  percentile >= ``threshold``) and the final model predicts another class than its label.
  Check the label. The mislabel score is csl (the training loss summed over epochs), the best
  measured mislabel detector of the table (README, "Which score to use"); a run without
  training records (scored checkpoints: csl is 0) uses the final model's loss instead.
- ``atypical``: its curvature is in the top ``1 - threshold`` share (``percentile >=
  threshold``; higher curvature = more memorized) and the final model agrees with its label: a
  rare or hard example of its class, the long tail curvature finds best. Keep it, and look at it.

Every other sample: null. The rule and its settings are stored in the table's metadata
(:func:`rule_metadata`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

CONFLICTING_DUPLICATE = "conflicting_duplicate"
MISLABEL = "mislabel"
ATYPICAL = "atypical"
KINDS = (CONFLICTING_DUPLICATE, MISLABEL, ATYPICAL)  # in order of precedence
DEFAULT_THRESHOLD = 0.9  # percentile from which a sample counts as standing out (top 10 %)
# The mislabel score by whether the run recorded its training (higher = more likely mislabeled).
MISLABEL_SCORES = {True: "csl", False: "final_loss"}
RULE = ("conflicting_duplicate: in a duplicate group whose labels disagree; else mislabel: the "
        "mislabel score's percentile (mislabel_score) >= threshold and final_pred != label; else "
        "atypical: curvature's percentile >= threshold and final_pred == label; else null")


def mislabel_score(columns: Mapping[str, np.ndarray], *, training_records: bool = True
                   ) -> tuple[str, np.ndarray]:
    """The mislabel score's name and its percentile (N,) float32 (share of samples with a strictly
    lower score, in [0, 1]): csl, or ``final_loss`` where the run has no training records."""
    from raycurv.table import rank_and_percentile  # raycurv.table imports KINDS from here

    name = MISLABEL_SCORES[bool(training_records)]
    return name, rank_and_percentile(np.asarray(columns[name]))[1]


def suspect(*, percentile: np.ndarray, mislabel_percentile: np.ndarray, label: np.ndarray,
            final_pred: np.ndarray, conflicting: np.ndarray | None,
            threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """The ``suspected`` kind of each sample, (N,) object array of str or None.

    percentile: (N,) curvature's percentile (share of samples with strictly lower curvature, in
    [0, 1]); mislabel_percentile: (N,) the mislabel score's (:func:`mislabel_score`); label and
    final_pred: (N,) ints; conflicting: (N,) bool, in a duplicate group whose labels disagree
    (None: duplicates were not searched, so no sample is a conflicting duplicate)."""
    n = len(percentile)
    arrays = {"mislabel_percentile": mislabel_percentile, "label": label, "final_pred": final_pred,
              **({"conflicting": conflicting} if conflicting is not None else {})}
    for name, values in arrays.items():
        if np.shape(values) != (n,):
            raise ValueError(f"{name} has shape {np.shape(values)}, expected ({n},) like percentile")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return _suspect(np.asarray(percentile), np.asarray(mislabel_percentile), np.asarray(label),
                    np.asarray(final_pred),
                    np.zeros(n, bool) if conflicting is None else np.asarray(conflicting, bool),
                    threshold)


def _suspect(percentile, mislabel_percentile, label, final_pred, conflicting,
             threshold: float) -> np.ndarray:
    # compared in float32, like the table's percentile column (so 27/30 >= 0.9 holds)
    cut = np.float32(threshold)
    agrees = final_pred == label
    out = np.full(len(percentile), None, dtype=object)
    out[(percentile.astype(np.float32) >= cut) & agrees] = ATYPICAL
    out[(mislabel_percentile.astype(np.float32) >= cut) & ~agrees] = MISLABEL
    out[conflicting] = CONFLICTING_DUPLICATE
    return out


def rule_metadata(*, threshold: float, duplicate_threshold: float | None,
                  mislabel_score: str) -> dict[str, Any]:
    """The ``suspected`` entry of a table's metadata: the rule, its percentile threshold, the
    mislabel score it ranks by, and the near-duplicate distance used (None: not searched)."""
    return {"rule": RULE, "threshold": threshold, "mislabel_score": mislabel_score,
            "duplicate_threshold": duplicate_threshold,
            "duplicates_searched": duplicate_threshold is not None}


def is_suspected(suspected: np.ndarray, kind: str) -> np.ndarray:
    """(N,) bool: the sample's ``suspected`` is ``kind`` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    return np.asarray(suspected, dtype=object) == kind
