"""The scoring copy of a model computes the same function: equal logits, equal curvature up to
float rounding (exactly so where no kink is near), the original model untouched."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from raycurv.curvature import curvature
from raycurv.models import CifarResNet18, SmallCNN
from raycurv.scoring_model import CPU_ACTIVATION_BUDGET, max_pass_size, prepare_for_scoring
from tests.test_curvature import smooth_cnn


def _warmed(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Batch-norm running statistics moved off their initial values, as after training."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape) * 1.5 + 0.3)
    return model


@pytest.mark.parametrize("build, shape, folds", [(lambda: SmallCNN(1, 10), (1, 8, 8), 3),
                                                 (lambda: CifarResNet18(3, 10), (3, 32, 32), 20)],
                         ids=["small_cnn", "resnet18_cifar"])
def test_logits_equal_and_every_batch_norm_folded(build, shape, folds):
    model = _warmed(build(), shape)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scoring = prepare_for_scoring(model, x)
    assert scoring.folded == folds
    assert not any(isinstance(m, nn.BatchNorm2d) for m in scoring.module.modules())
    assert not any(p.requires_grad for p in scoring.module.parameters())
    # the model itself is left as it was: training mode, trainable, same weights
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        expected = model.eval()(x)
        got = scoring.module(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _plain_and_prepared(model: nn.Module, *, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Curvature (n,) of n random 28x28 samples on ``model`` as given and on its scoring copy."""
    model = _warmed(model, (1, 28, 28))
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    common = dict(sample_ids=torch.arange(n), epoch=0, h=0.03, probes=4)
    plain = curvature(model, x, y, **common).curvature
    scoring = prepare_for_scoring(model, x)
    return plain, curvature(scoring.module, x, y, max_pass=scoring.max_pass, **common).curvature


def test_curvature_equal_within_1e5_where_no_kink_is_near():
    plain, fast = _plain_and_prepared(smooth_cnn(), n=64, seed=2)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=0)


def test_relu_model_differs_only_where_rounding_flips_a_kink():
    """With ReLU and max-pool, a perturbed input within rounding of a kink can land on its
    other side in one kernel and not the other: a few samples move, the ranking does not."""
    plain, fast = _plain_and_prepared(SmallCNN(1, 10), n=128, seed=3)
    rel = (fast - plain).abs() / plain
    assert rel.median() < 1e-6
    assert (rel <= 1e-5).float().mean() >= 0.9
    assert spearmanr(fast.numpy(), plain.numpy()).statistic > 0.999


def test_without_options_it_is_a_frozen_eval_copy():
    model = _warmed(SmallCNN(1, 10), (1, 8, 8))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    scoring = prepare_for_scoring(model, x, fold_batch_norm=False, channels_last=False)
    assert scoring.folded == 0 and type(scoring.module) is SmallCNN
    assert not scoring.module.training
    common = dict(sample_ids=torch.arange(16), epoch=0, h=0.03, probes=3)
    assert torch.equal(curvature(scoring.module, x, y, **common).curvature,
                       curvature(model, x, y, **common).curvature)


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bn(self.conv(x))
        if z.mean() > 0:
            z = z * 2
        return self.head(z.mean(dim=(2, 3)))


def test_a_model_that_does_not_trace_is_scored_unfolded():
    model = _warmed(_Branchy(), (1, 6, 6)).eval()
    x = torch.randn(8, 1, 6, 6)
    scoring = prepare_for_scoring(model, x)
    assert scoring.folded == 0
    with torch.no_grad():
        torch.testing.assert_close(scoring.module(x), model(x))


@pytest.mark.parametrize("side", [8, 28, 32])
def test_cpu_pass_size_keeps_the_largest_activation_within_budget(side):
    model = SmallCNN(1, 10).eval()  # largest activation: the first conv's 32 x side x side
    got = max_pass_size(model, torch.randn(2, 1, side, side))
    assert got == min(2048, CPU_ACTIVATION_BUDGET // (32 * side * side))
    assert got * 32 * side * side <= CPU_ACTIVATION_BUDGET
