"""The estimator against an exact input Hessian, against the authors' formulation, and for
independence from batch composition."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bench.estimator import authors_formulation
from raycurv.curvature import curvature, ieee_fp32, rademacher_probes
from raycurv.models import SmallCNN

SHAPE = (1, 2, 3)  # a tiny "image": D = 6 input elements


def softmax_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()


def tanh_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def exact_hessians(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, D, D) input Hessians of each sample's loss, by torch.func (no finite differences)."""

    def loss(xi, yi):
        return F.cross_entropy(model(xi[None]), yi[None])

    return torch.stack([torch.func.hessian(loss)(xi, yi).reshape(6, 6) for xi, yi in zip(x, y, strict=True)])


@pytest.fixture(params=[softmax_linear, tanh_mlp], ids=["softmax-linear", "tanh-mlp"])
def problem(request):
    model = request.param()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, *SHAPE, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, model[-1].out_features, (5,), generator=gen)
    return model, x, y, torch.arange(100, 105)


def test_trace_matches_exact_hessian_on_the_same_probes(problem):
    model, x, y, ids = problem
    n, h = 7, 1e-5
    got = curvature(model, x, y, sample_ids=ids, epoch=3, seed=11, h=h, probes=n, variant="trace").curvature
    hess = exact_hessians(model, x, y)
    v = rademacher_probes(seed=11, epoch=3, sample_ids=ids, probe_indices=torch.arange(n),
                          shape=SHAPE, dtype=torch.float64).reshape(n, 5, 6)
    hv = torch.einsum("bij,nbj->nbi", hess, v)
    expected = hv.pow(2).sum(-1).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


def test_norm_is_h_times_mean_hessian_vector_norm(problem):
    model, x, y, ids = problem
    n, h = 5, 1e-5
    got = curvature(model, x, y, sample_ids=ids, epoch=0, seed=4, h=h, probes=n, variant="norm").curvature
    v = rademacher_probes(seed=4, epoch=0, sample_ids=ids, probe_indices=torch.arange(n),
                          shape=SHAPE, dtype=torch.float64).reshape(n, 5, 6)
    hv = torch.einsum("bij,nbj->nbi", exact_hessians(model, x, y), v)
    torch.testing.assert_close(got, h * hv.norm(dim=-1).mean(0), rtol=1e-4, atol=0)


@pytest.mark.parametrize("variant", ["norm", "trace"])
def test_hvp_method_is_the_exact_hessian_vector_product(problem, variant):
    model, x, y, ids = problem
    n, h = 6, 0.05  # no finite difference: any h gives h H v exactly
    got = curvature(model, x, y, sample_ids=ids, epoch=1, seed=2, h=h, probes=n, variant=variant,
                    method="hvp").curvature
    v = rademacher_probes(seed=2, epoch=1, sample_ids=ids, probe_indices=torch.arange(n),
                          shape=SHAPE, dtype=torch.float64).reshape(n, 5, 6)
    hv = torch.einsum("bij,nbj->nbi", exact_hessians(model, x, y), v)
    expected = h * hv.norm(dim=-1).mean(0) if variant == "norm" else hv.pow(2).sum(-1).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_finite_differences_converge_to_hvp_as_h_shrinks(problem):
    model, x, y, ids = problem
    common = dict(sample_ids=ids, epoch=0, seed=5, probes=4)
    errors = []
    for h in (1e-2, 1e-3, 1e-4):
        fd = curvature(model, x, y, h=h, **common).curvature
        hvp = curvature(model, x, y, h=h, method="hvp", **common).curvature
        errors.append(((fd - hvp).abs() / hvp).max().item())
    assert errors[-1] < 1e-3  # O(h): each tenfold smaller h is about tenfold closer
    assert errors[0] > 5 * errors[1] > 25 * errors[2] or errors[0] < 1e-8


def test_mixed_precision_hvp_stays_close_to_fp32():
    model = _trained_cnn(smooth=True)
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    common = dict(sample_ids=torch.arange(32), epoch=0, h=1e-3, probes=4, method="hvp")
    fp32 = curvature(model, x, y, **common).curvature
    bf16 = curvature(model, x, y, precision="bf16", **common).curvature
    rel = (bf16 - fp32).abs() / fp32
    assert rel.median() < 0.02 and rel.max() < 0.1  # bf16 keeps ~3 significant digits
    assert rel.max() > 0  # it did run in reduced precision


def test_trace_mean_over_many_probes_is_trace_of_h_squared(problem):
    model, x, y, ids = problem
    got = curvature(model, x, y, sample_ids=ids, epoch=0, seed=0, h=1e-5, probes=4000,
                    variant="trace").curvature
    hess = exact_hessians(model, x, y)
    tr_h2 = torch.einsum("bij,bji->b", hess, hess)
    torch.testing.assert_close(got, tr_h2, rtol=0.05, atol=1e-12)


def smooth_cnn() -> nn.Module:
    """SmallCNN with smooth activations and pooling: no kinks for a finite step to cross."""
    model = SmallCNN(1, 10)
    for name, module in model.features.named_children():
        if isinstance(module, nn.ReLU):
            model.features._modules[name] = nn.SiLU()
        elif isinstance(module, nn.MaxPool2d):
            model.features._modules[name] = nn.AvgPool2d(2)
    return model


def _trained_cnn(smooth: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = smooth_cnn() if smooth else SmallCNN(1, 10)
    model.train()
    with torch.no_grad():  # move batch-norm running statistics away from their initial values
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8))
    return model


def test_norm_equals_authors_formulation():
    model = _trained_cnn()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    ids = torch.arange(16) * 7
    ours = curvature(model, x, y, sample_ids=ids, epoch=2, seed=9, h=1e-3, probes=6).curvature
    assert model.training, "curvature() must restore the model's mode"
    assert all(p.requires_grad for p in model.parameters())
    theirs = authors_formulation(model, x, y, ids, epoch=2, seed=9, h=1e-3, n=6)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)


def test_score_does_not_depend_on_batch_or_probe_chunking():
    model = _trained_cnn()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(40, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (40,), generator=gen)
    ids = torch.arange(1000, 1040)
    whole = curvature(model, x, y, sample_ids=ids, epoch=1, seed=3).curvature
    # other batch sizes, other companions, the samples in another order, one probe per pass
    parts = torch.cat([curvature(model, x[i:i + 7], y[i:i + 7], sample_ids=ids[i:i + 7], epoch=1,
                                 seed=3, probe_chunk=1).curvature for i in range(0, 40, 7)])
    capped = curvature(model, x, y, sample_ids=ids, epoch=1, seed=3, max_pass=9).curvature
    perm = torch.randperm(40, generator=gen)
    shuffled = curvature(model, x[perm], y[perm], sample_ids=ids[perm], epoch=1, seed=3).curvature
    # fp32 finite differences: equal up to kernel rounding, relative to the scale of the scores
    atol = 1e-5 * whole.max().item()
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=atol)
    torch.testing.assert_close(capped, whole, rtol=1e-5, atol=atol)  # 40 cut into 5 x 8, 1 probe a pass
    torch.testing.assert_close(shuffled, whole[perm], rtol=1e-5, atol=atol)
    # ... but another epoch or seed draws other probes
    assert not torch.allclose(curvature(model, x, y, sample_ids=ids, epoch=2, seed=3).curvature, whole)


def test_probes_are_balanced_signs_and_a_function_of_their_key():
    ids = torch.arange(64)
    v = rademacher_probes(seed=1, epoch=0, sample_ids=ids, probe_indices=torch.arange(8), shape=(3, 9, 9))
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(v.mean().item()) < 0.01
    again = rademacher_probes(seed=1, epoch=0, sample_ids=ids[10:20], probe_indices=torch.arange(2, 5),
                              shape=(3, 9, 9))
    assert torch.equal(again, v[2:5, 10:20])
    other_seed = rademacher_probes(seed=2, epoch=0, sample_ids=ids, probe_indices=torch.arange(8), shape=(3, 9, 9))
    assert 0.4 < (other_seed == v).float().mean().item() < 0.6


def test_finite_differences_run_without_tf32_on_cuda_and_restore_it():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = True
    try:
        with ieee_fp32(torch.device("cuda")):  # flags only: no GPU needed to check them
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
            assert cudnn.conv.fp32_precision != "tf32"  # the newer API sees the same
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
        with ieee_fp32(torch.device("cpu")):
            assert cudnn.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_bad_arguments_are_refused():
    model, x, y = _trained_cnn(), torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    ids = torch.arange(2)
    with pytest.raises(ValueError, match="valid: norm, trace"):
        curvature(model, x, y, sample_ids=ids, epoch=0, variant="hutch")
    with pytest.raises(ValueError, match="h must be > 0"):
        curvature(model, x, y, sample_ids=ids, epoch=0, h=0.0)
    with pytest.raises(ValueError, match="probes must be >= 1"):
        curvature(model, x, y, sample_ids=ids, epoch=0, probes=0)
    with pytest.raises(ValueError, match="valid: fd, hvp"):
        curvature(model, x, y, sample_ids=ids, epoch=0, method="exact")
    with pytest.raises(ValueError, match="mixed precision cannot resolve a finite difference"):
        curvature(model, x, y, sample_ids=ids, epoch=0, precision="bf16")
    with pytest.raises(ValueError, match="valid: None, bf16, fp16"):
        curvature(model, x, y, sample_ids=ids, epoch=0, method="hvp", precision="fp8")
    with pytest.raises(ValueError, match="max_pass must be >= 1"):
        curvature(model, x, y, sample_ids=ids, epoch=0, max_pass=0)
