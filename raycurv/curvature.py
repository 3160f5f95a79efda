"""Input-loss curvature, the memorization score (Garg, Ravikumar & Roy, ICML 2024). Pure torch.

For a sample (x, y) and a model f in eval mode:

    l(x)   = cross_entropy(f(x), y)              per sample, never a batch mean
    g(x)   = dl/dx                               gradient with respect to the input only
    d_j    = g(x + h v_j) - g(x)                 v_j: Rademacher probes (+1/-1 per input element)
             (method "hvp": h H v_j exactly, by forward-over-reverse autodiff; the h -> 0 limit)
    norm:  c(x) = (1/n) sum_j ||d_j||_2          the authors' released estimator
    trace: c(x) = (1/n) sum_j ||d_j||_2^2 / h^2  finite-difference Tr(H^2) = E||H v||^2

Higher curvature = the loss bends more sharply around the sample = more memorized. g(x) is
computed once per call, the n perturbed gradients in as few passes as memory allows, and a
sample's probes depend on (seed, epoch, sample_id, probe index) alone, so its score does not
depend on the batch it was scored in (up to the float rounding of differently shaped kernels).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from raycurv.config import DEFAULT_H, DEFAULT_PROBES, DEFAULT_VARIANT  # constants only, no I/O

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32, in int64 without overflow (split c in 16-bit halves)."""
    hi, lo = c >> 16, c & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (xor-shift-multiply), on int64 tensors holding uint32."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rademacher_probes(*, seed: int, epoch: int, sample_ids: torch.Tensor, probe_indices: torch.Tensor,
                      shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """+1/-1 probes, a pure function of (seed, epoch, sample_id, probe index, element index).

    sample_ids: (B,) int64; probe_indices: (k,) int64. Returns (k, B, *shape) of ``dtype`` on the
    device of ``sample_ids``. A counter-based hash: each 32-bit hash word yields 32 signs.
    """
    device = sample_ids.device
    numel = 1
    for size in shape:
        numel *= size
    scalar = torch.tensor([seed & _M32, (seed >> 32) & _M32, epoch & _M32], device=device)
    key = _mix32(_mix32(scalar[0] ^ _mix32(scalar[1] + 0x3C6EF372)) ^ scalar[2])  # ()
    sid = sample_ids.to(torch.int64)
    key = _mix32(key ^ (sid & _M32))
    key = _mix32(key ^ ((sid >> 32) & _M32))  # (B,)
    key = _mix32(key[None, :] ^ _mix32(probe_indices.to(device, torch.int64)[:, None] + 0x9E3779B9))
    words = torch.arange((numel + 31) // 32, device=device, dtype=torch.int64)
    words = _mix32(key[..., None] ^ _mix32(words + 0x632BE5AB))  # (k, B, W)
    bits = (words[..., None] >> torch.arange(32, device=device)) & 1  # (k, B, W, 32)
    bits = bits.flatten(start_dim=2)[..., :numel]
    signs = (1 - 2 * bits).to(dtype)
    return signs.reshape(*signs.shape[:2], *shape)


@dataclass
class CurvatureResult:
    """Per-sample outputs of one scoring pass, each (B,)."""

    curvature: torch.Tensor  # float: higher = more memorized
    loss: torch.Tensor  # float: cross-entropy on the given label, unperturbed input
    pred: torch.Tensor  # int64: argmax class
    confidence: torch.Tensor  # float: softmax probability of the given label
    probe_norms: torch.Tensor  # (n, B) float: ||d_j||_2 per probe, from which every variant follows


def _norm_terms(norms: torch.Tensor, h: float) -> torch.Tensor:
    return norms


def _trace_terms(norms: torch.Tensor, h: float) -> torch.Tensor:
    return norms.pow(2) / (h * h)


# variant -> per-probe term from ||d_j||, d_j = g(x + h v_j) - g(x); shape (n, B) -> (n, B)
VARIANTS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "norm": _norm_terms,
    "trace": _trace_terms,
}


def reduce_probe_norms(probe_norms: torch.Tensor, *, h: float, variant: str) -> torch.Tensor:
    """Curvature (B,) of ``variant`` from per-probe norms (n, B): the mean of the per-probe terms.
    The first n' rows of an n-probe result are exactly an n'-probe result (same probes)."""
    return VARIANTS[variant](probe_norms, h).mean(dim=0)


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (running batch-norm statistics, no dropout) and no parameter gradients, restored
    afterwards: scoring differentiates with respect to the input only."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample loss (B,), its gradient with respect to x (B, ...), and the logits (B, C).

    The loss is summed, not averaged: in eval mode samples do not interact, so the gradient of
    the sum is each sample's own gradient, independent of the batch.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad, logits.detach()


def default_probe_chunk(batch: int, probes: int, *, max_pass: int = 512) -> int:
    """How many probes go into one forward/backward pass: as many as keep a pass at most
    ``max_pass`` samples (the memory cap), at least one."""
    return max(1, min(probes, max_pass // max(batch, 1)))


def _fd_probe_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, *,
                    epoch: int, seed: int, h: float, probes: int, probe_chunk: int,
                    half: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """||g(x + h v_j) - g(x)|| (n, B): g(x) once, then the probes ``probe_chunk`` at a time."""
    batch, shape = x.shape[0], tuple(x.shape[1:])
    loss, g0, logits = input_gradient(model, x, y)
    g0 = g0.reshape(1, batch, -1)
    norms = []
    for start in range(0, probes, probe_chunk):
        idx = torch.arange(start, min(start + probe_chunk, probes), device=x.device)
        v = rademacher_probes(seed=seed, epoch=epoch, sample_ids=sample_ids, probe_indices=idx,
                              shape=shape, dtype=x.dtype)  # (k, B, *shape)
        xs = (x.detach()[None] + h * v).reshape(len(idx) * batch, *shape)
        _, g, _ = input_gradient(model, xs, y.repeat(len(idx)))
        norms.append((g.reshape(len(idx), batch, -1) - g0).norm(dim=-1))  # (k, B)
    return torch.cat(norms), loss, logits


def _hvp_probe_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, *,
                     epoch: int, seed: int, h: float, probes: int, probe_chunk: int,
                     half: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """||h H v_j|| (n, B), H the input Hessian of the per-sample loss, by forward-over-reverse
    autodiff (a jvp of the input gradient): the h -> 0 limit of the finite difference, with no
    difference to lose to rounding, so it may run in half precision."""
    batch, shape = x.shape[0], tuple(x.shape[1:])
    # half precision: weights and activations in ``half`` (torch.autocast does not reach
    # forward-mode tangents), the loss and the norms in x's dtype
    low = model if half is None else copy.deepcopy(model).to(half)

    def loss_sum(u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = low(u if half is None else u.to(half)).to(u.dtype)
        # summed loss: samples do not interact in eval mode, so this is each sample's gradient
        return F.cross_entropy(logits, labels, reduction="sum")

    def grad_of(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(loss_sum)(z, labels)

    with torch.no_grad():
        logits = model(x)  # (B, C), full precision
    loss = F.cross_entropy(logits, y, reduction="none")
    norms = []
    for start in range(0, probes, probe_chunk):
        idx = torch.arange(start, min(start + probe_chunk, probes), device=x.device)
        v = rademacher_probes(seed=seed, epoch=epoch, sample_ids=sample_ids, probe_indices=idx,
                              shape=shape, dtype=x.dtype).reshape(len(idx) * batch, *shape)
        xs = x.detach().repeat(len(idx), *([1] * len(shape)))  # (k B, *shape), probe-major like v
        labels = y.repeat(len(idx))
        with warnings.catch_warnings():  # torch's forward-AD decompositions load via jit.script once
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated",
                                    category=FutureWarning)
            _, hv = torch.func.jvp(lambda z, labels=labels: grad_of(z, labels), (xs,), (v,))  # H v
        norms.append((h * hv.to(x.dtype)).reshape(len(idx), batch, -1).norm(dim=-1))  # (k, B)
    return torch.cat(norms), loss, logits


# method -> per-probe norms ||d_j||: "fd" the finite difference g(x + h v_j) - g(x) (the paper's
# estimator, the default); "hvp" its exact first-order term h H v_j (agrees with "fd" to O(h) where
# the model is smooth; ignores the ReLU kinks a finite step crosses)
METHODS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
    "fd": _fd_probe_norms,
    "hvp": _hvp_probe_norms,
}
HALF_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """Full IEEE fp32 convolutions and matrix products on CUDA (no TF32, whose 10-bit mantissa
    would swallow a finite difference at small h), restored afterwards; elsewhere a no-op. Set
    through the ``allow_tf32`` flags, which every reader of either TF32 API understands."""
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def _curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, *,
               variant: str, h: float, size: int, method: str, **options) -> CurvatureResult:
    pieces = [METHODS[method](model, x[a:a + size], y[a:a + size], sample_ids[a:a + size], h=h,
                              **options) for a in range(0, x.shape[0], size)]
    probe_norms = torch.cat([p[0] for p in pieces], dim=1)  # (n, B)
    loss = torch.cat([p[1] for p in pieces])
    logits = torch.cat([p[2] for p in pieces])
    probs = logits.softmax(dim=1)
    return CurvatureResult(
        curvature=reduce_probe_norms(probe_norms, h=h, variant=variant),
        probe_norms=probe_norms,
        loss=loss,
        pred=logits.argmax(dim=1),
        confidence=probs.gather(1, y[:, None]).squeeze(1),
    )


def curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sample_ids: torch.Tensor,
              epoch: int, seed: int = 0, h: float = DEFAULT_H, probes: int = DEFAULT_PROBES,
              variant: str = DEFAULT_VARIANT,
              method: str = "fd", precision: str | None = None, max_pass: int = 512,
              probe_chunk: int | None = None) -> CurvatureResult:
    """Score a batch: x (B, C, H, W) normalized, unaugmented inputs; y (B,) labels the model was
    trained on; sample_ids (B,) int64. Runs ``model`` in eval mode without parameter gradients
    and restores its state. Returns per-sample curvature (higher = more memorized) and the loss,
    prediction and confidence of the unperturbed input.

    method: "fd" (finite differences, the default) or "hvp" (exact Hessian-vector products).
    precision: None (the input's dtype) or "bf16"/"fp16": the Hessian-vector products in half
    precision (loss and norms in x's dtype), for "hvp" only: a half-precision input cannot even
    represent x + h v, so "fd" refuses it. max_pass: the most samples one forward/backward pass
    holds (the memory cap; larger batches are cut into equal parts); probe_chunk: probes per pass
    (default: as many as max_pass allows). Neither changes the values beyond float rounding.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if precision is not None and precision not in HALF_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: None, {', '.join(HALF_PRECISIONS)}")
    if precision is not None and method == "fd":
        raise ValueError("mixed precision cannot resolve a finite difference (a bf16/fp16 input "
                         "does not represent x + h v for small h); use method='hvp' for half precision")
    if not h > 0:
        raise ValueError(f"h must be > 0, got {h}")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if max_pass < 1:
        raise ValueError(f"max_pass must be >= 1, got {max_pass}")
    if x.ndim < 2 or y.shape != (x.shape[0],) or sample_ids.shape != (x.shape[0],):
        raise ValueError(f"need x (B, ...), y (B,), sample_ids (B,); got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(sample_ids.shape)}")
    parts = -(-x.shape[0] // max_pass)  # the batch cut into equal parts of <= max_pass samples
    size = -(-x.shape[0] // parts)
    chunk = probe_chunk or default_probe_chunk(size, probes, max_pass=max_pass)
    # fp32 means IEEE fp32: no TF32 for finite differences, nor for "hvp" unless in half precision
    with scoring_mode(model), ieee_fp32(x.device) if precision is None else contextlib.nullcontext():
        return _curvature(model, x, y.long(), sample_ids.to(x.device), epoch=epoch, seed=seed,
                          h=h, probes=probes, variant=variant, probe_chunk=chunk, method=method,
                          size=size, half=HALF_PRECISIONS[precision] if precision else None)
