"""Training dynamics: per-sample co-scores read off the training pass itself, at no extra pass.

Every epoch, the training forward pass (train mode, augmented input, the label trained on) gives
each sample's logits z. raycurv records, per sample and epoch (TRAINING_RECORDS):

    train_loss         cross_entropy(z, y)                      (csl is its sum over epochs)
    train_margin       z_y - max_{k != y} z_k                   the logit margin
    train_prob_margin  p_y - max_{k != y} p_k,  p = softmax(z)  the probability margin, in [-1, 1]

A sample is *correct* in an epoch when its logit margin is positive (the label trained on is the
model's unique prediction). From the (epochs, N) records, :func:`co_scores` gives per sample:

    aum                mean logit margin over epochs (area under the margin, Pleiss et al. 2020);
                       LOWER = more likely mislabeled / memorized
    margin             mean probability margin over epochs; LOWER = more likely mislabeled
    forgetting_events  correct -> incorrect transitions between consecutive epochs (Toneva et
                       al. 2019); HIGHER = harder / more memorized
    learned_epoch      the first epoch from which the sample is correct in every later epoch
                       ("learned for good"); none (-1) if it is incorrect in the last epoch;
                       LATER (or none) = harder / more memorized

A sample with a missing record (NaN: an epoch trained before raycurv kept margins, in a resumed
run folder) has no co-scores: NaN for aum and margin, -1 for the counts.
"""

from __future__ import annotations

import numpy as np
import torch

TRAINING_RECORDS = ("train_loss", "train_margin", "train_prob_margin")
CO_SCORES = ("aum", "margin", "forgetting_events", "learned_epoch")


def training_margins(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit margin and probability margin of ``labels`` (B,) under ``logits`` (B, classes):
    the label's value minus the largest other one, each (B,); positive = the label is predicted.
    Detached: recording them never touches the gradient."""
    if logits.ndim != 2 or logits.shape[1] < 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, classes >= 2) and labels "
                         f"{tuple(labels.shape)} (B,)")
    return _margins(logits.detach(), labels)


def co_scores(margin: np.ndarray, prob_margin: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample co-scores (see the module docstring) from the per-epoch training records
    ``margin`` and ``prob_margin``, each (epochs, N), NaN where an epoch's record is missing.

    Returns aum and margin (N,) float32 (NaN: no complete record), forgetting_events and
    learned_epoch (N,) int32 (-1: no complete record; learned_epoch also -1 for a sample
    incorrect in the last epoch)."""
    margin = np.asarray(margin)
    prob_margin = np.asarray(prob_margin)
    if margin.ndim != 2 or prob_margin.shape != margin.shape or margin.shape[0] < 1:
        raise ValueError(f"margin {margin.shape} and prob_margin {prob_margin.shape} must be "
                         "(epochs >= 1, N) each")
    return _co_scores(margin.astype(np.float64), prob_margin.astype(np.float64))


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index = labels[:, None]
    out = []
    for values in (logits, logits.softmax(1)):
        assigned = values.gather(1, index).squeeze(1)
        other = values.scatter(1, index, float("-inf")).amax(1)
        out.append(assigned - other)
    return out[0], out[1]


def _co_scores(margin: np.ndarray, prob_margin: np.ndarray) -> dict[str, np.ndarray]:
    epochs = margin.shape[0]
    complete = ~(np.isnan(margin).any(axis=0) | np.isnan(prob_margin).any(axis=0))
    correct = margin > 0  # (epochs, N)
    forgotten = (correct[:-1] & ~correct[1:]).sum(axis=0)
    # the last incorrect epoch, -1 if none: learned for good from the epoch after it
    last_wrong = epochs - 1 - np.argmax(~correct[::-1], axis=0)
    last_wrong = np.where((~correct).any(axis=0), last_wrong, -1)
    learned = np.where(last_wrong < epochs - 1, last_wrong + 1, -1)
    with np.errstate(invalid="ignore"):
        return {
            "aum": np.where(complete, margin.mean(axis=0), np.nan).astype(np.float32),
            "margin": np.where(complete, prob_margin.mean(axis=0), np.nan).astype(np.float32),
            "forgetting_events": np.where(complete, forgotten, -1).astype(np.int32),
            "learned_epoch": np.where(complete, learned, -1).astype(np.int32),
        }
