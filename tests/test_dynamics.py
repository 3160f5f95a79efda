"""Training-dynamics co-scores: margins from the training pass, and aum, margin, forgetting
events and the learned-for-good epoch from the per-epoch records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycurv.config import DataSpec
from raycurv.data import prepare_dataset
from raycurv.data.transforms import crop_padding
from raycurv.dynamics import CO_SCORES, TRAINING_RECORDS, co_scores, training_margins
from raycurv.models import build_model
from raycurv.train import TrainData, _train_epoch, epoch_data


def test_margins_are_the_label_minus_the_largest_other():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 1])
    margin, prob_margin = training_margins(logits, labels)
    torch.testing.assert_close(margin, torch.tensor([1.0, -2.0, 0.0]))
    p = logits.softmax(1)
    torch.testing.assert_close(prob_margin, torch.stack([p[0, 0] - p[0, 1], p[1, 2] - p[1, 1],
                                                         p[2, 1] - p[2, 0]]))
    with pytest.raises(ValueError, match="must be"):
        training_margins(logits[:, :1], labels)


def test_co_scores_from_per_epoch_margins():
    # samples (columns): always right; learned at epoch 2; forgotten twice and never relearned;
    # forgotten once then relearned at epoch 3; an epoch without a record
    margin = np.array([[1.0, -1.0, 2.0, 1.0, 1.0],
                       [2.0, -0.5, -1.0, -1.0, np.nan],
                       [3.0, 0.5, 1.0, -2.0, 1.0],
                       [4.0, 1.0, -1.0, 1.0, 1.0]])
    prob = np.clip(margin / 10, -1, 1)
    got = co_scores(margin, prob)
    assert list(got) == list(CO_SCORES)
    np.testing.assert_allclose(got["aum"][:4], [2.5, 0.0, 0.25, -0.25])
    np.testing.assert_allclose(got["margin"][:4], [0.25, 0.0, 0.025, -0.025], atol=1e-7)
    np.testing.assert_array_equal(got["forgetting_events"], [0, 0, 2, 1, -1])
    np.testing.assert_array_equal(got["learned_epoch"], [0, 2, -1, 3, -1])
    assert np.isnan(got["aum"][4]) and np.isnan(got["margin"][4])
    assert got["aum"].dtype == np.float32 and got["learned_epoch"].dtype == np.int32
    with pytest.raises(ValueError, match="epochs >= 1"):
        co_scores(margin[0], prob[0])


def test_the_training_pass_records_loss_and_margins_of_the_same_logits():
    """One epoch of the real training step: the logit margin is positive exactly for the samples
    counted correct, and the probability margin lies in [-1, 1] with the same sign."""
    data = prepare_dataset(DataSpec(limit=200, noise=0.2), seed=0)
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    payload = TrainData.of(data)
    batches = epoch_data(payload, world=1, rank=0, batch_size=32, seed=0, epoch=0)
    records, _, correct = _train_epoch(model, opt, payload, batches, device="cpu",
                                       generator=torch.Generator().manual_seed(0),
                                       pad=crop_padding(8))
    assert records.shape == (len(TRAINING_RECORDS), 200)
    loss, margin, prob_margin = records
    assert (loss > 0).all() and 0 < correct < 200
    assert int((margin > 0).sum()) == correct
    assert (np.abs(prob_margin) <= 1).all() and ((prob_margin > 0) == (margin > 0)).all()
