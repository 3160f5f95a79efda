"""What to do about a sample: the score table's ``suspected`` column (contract 1.2).

A sample is suspected where it stands out, of one kind, the first that applies:

- ``conflicting_duplicate``: it belongs to a group of exact or near-duplicate images
  (raycurv.duplicates) whose labels disagree: the same picture carrying two labels, which a
  network can fit only by memorizing one of them. Relabel the group, or keep one image.
- ``mislabel``: its curvature is in the top ``1 - threshold`` share (``percentile >= threshold``;
  higher curvature = more memorized) and the final model predicts another class than its label.
  Check the label.
- ``atypical``: in that top share, and the final model agrees with its label: a rare or hard
  example of its class. Keep it, and look at it.

Every other sample: null. The rule and its settings are stored in the table's metadata
(:func:`rule_metadata`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CONFLICTING_DUPLICATE = "conflicting_duplicate"
MISLABEL = "mislabel"
ATYPICAL = "atypical"
KINDS = (CONFLICTING_DUPLICATE, MISLABEL, ATYPICAL)  # in order of precedence
DEFAULT_THRESHOLD = 0.9  # percentile from which a sample counts as standing out (top 10 %)
RULE = ("conflicting_duplicate: in a duplicate group whose labels disagree; else mislabel: "
        "percentile >= threshold and final_pred != label; else atypical: percentile >= threshold "
        "and final_pred == label; else null")


def suspect(*, percentile: np.ndarray, label: np.ndarray, final_pred: np.ndarray,
            conflicting: np.ndarray | None, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """The ``suspected`` kind of each sample, (N,) object array of str or None.

    percentile: (N,) share of samples with strictly lower curvature, in [0, 1]; label and
    final_pred: (N,) ints; conflicting: (N,) bool, in a duplicate group whose labels disagree
    (None: duplicates were not searched, so no sample is a conflicting duplicate)."""
    n = len(percentile)
    arrays = {"label": label, "final_pred": final_pred,
              **({"conflicting": conflicting} if conflicting is not None else {})}
    for name, values in arrays.items():
        if np.shape(values) != (n,):
            raise ValueError(f"{name} has shape {np.shape(values)}, expected ({n},) like percentile")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return _suspect(np.asarray(percentile), np.asarray(label), np.asarray(final_pred),
                    np.zeros(n, bool) if conflicting is None else np.asarray(conflicting, bool),
                    threshold)


def _suspect(percentile, label, final_pred, conflicting, threshold: float) -> np.ndarray:
    # compared in float32, like the table's percentile column (so 27/30 >= 0.9 holds)
    high = percentile.astype(np.float32) >= np.float32(threshold)
    out = np.full(len(percentile), None, dtype=object)
    out[high & (final_pred == label)] = ATYPICAL
    out[high & (final_pred != label)] = MISLABEL
    out[conflicting] = CONFLICTING_DUPLICATE
    return out


def rule_metadata(*, threshold: float, duplicate_threshold: float | None) -> dict[str, Any]:
    """The ``suspected`` entry of a table's metadata: the rule, its percentile threshold, and the
    near-duplicate distance used (None: duplicates not searched)."""
    return {"rule": RULE, "threshold": threshold, "duplicate_threshold": duplicate_threshold,
            "duplicates_searched": duplicate_threshold is not None}


def is_suspected(suspected: np.ndarray, kind: str) -> np.ndarray:
    """(N,) bool: the sample's ``suspected`` is ``kind`` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    return np.asarray(suspected, dtype=object) == kind
