"""The model as scoring runs it: the same function, arranged to be cheaper to differentiate.

Scoring takes n + 1 input-gradient passes per sample on a frozen, eval-mode model, so anything
done once per epoch's weights to make a pass cheaper pays n + 1 times per sample:

- eval-mode batch norm is an affine map per channel; folded into the convolution before it
  (torch.fx's conv/bn fusion), it costs nothing at run time and its backward disappears;
- channels-last weights and activations: the layout the CPU (oneDNN) and GPU (cuDNN) convolution
  kernels are fastest in;
- parameters frozen (no autograd bookkeeping for them);
- optionally torch.compile;
- and a pass size that suits the device (``max_pass_size``).

Each of these changes kernels, hence float rounding, and nothing else: scores agree with the
unprepared model to float32 rounding, except where a perturbed input sits within rounding of a
ReLU or max-pool kink (bench/estimator.py reports how many samples that moves, and by how much).
Pure torch, no Ray or I/O.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

# On a CPU, per-sample throughput of a pass falls once its largest activation outgrows the
# caches (bench/estimator.py prints the curve): a pass holds at most this many elements in its
# largest activation. Elsewhere passes are capped at MAX_PASS samples and a quarter of free memory.
CPU_ACTIVATION_BUDGET = 1 << 22
MAX_PASS = 512


@dataclass(frozen=True)
class ScoringModel:
    """``module``: eval mode, frozen, to be passed to ``raycurv.curvature.curvature`` with
    ``max_pass``, the most samples one of its forward/backward passes should hold."""

    module: nn.Module
    max_pass: int
    folded: int  # batch norms folded into convolutions (0: none, or the model does not trace)


class _ChannelsLastInput(nn.Module):
    """Hands 4-d inputs to ``inner`` in channels-last layout (same values, other strides)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.inner(x)


def _fold_batch_norms(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` (eval mode) with each batch norm that solely follows a convolution
    folded into it, and how many were folded; an untraceable model comes back as a plain copy."""
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    try:
        folded = fuse(model)  # copies; needs eval mode
    except Exception:  # data-dependent control flow or ops fx cannot trace: score it unfolded
        return copy.deepcopy(model), 0
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    return folded, before - after


def _activation_sizes(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(largest, total) elements the modules of ``model`` output for one sample like ``example``."""
    sizes = [0]

    def record(module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output[0].numel())

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return max(sizes), sum(sizes)


def max_pass_size(model: nn.Module, example: torch.Tensor) -> int:
    """Samples per forward/backward pass for ``model`` (eval mode) on inputs like ``example``
    (B, ...) on its device: on a CPU as many as keep the largest activation within
    CPU_ACTIVATION_BUDGET elements (at most 4 * MAX_PASS); on CUDA at most MAX_PASS and a quarter
    of free memory at ~3 copies of every activation; elsewhere MAX_PASS."""
    largest, total = _activation_sizes(model, example)
    if example.device.type == "cpu":
        return max(1, min(4 * MAX_PASS, CPU_ACTIVATION_BUDGET // max(largest, 1)))
    if example.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(example.device)
        per_sample = 3 * total * example.element_size()
        return max(1, min(MAX_PASS, free // 4 // max(per_sample, 1)))
    return MAX_PASS


def prepare_for_scoring(model: nn.Module, example: torch.Tensor, *, fold_batch_norm: bool = True,
                        channels_last: bool = True, compile: bool = False) -> ScoringModel:
    """A scoring copy of ``model`` (which is left as it is) for inputs like ``example`` (B, C, H, W),
    made once per epoch's weights. Without any option it is an eval-mode, frozen copy."""
    was_training = model.training
    model.eval()
    try:
        module, folded = _fold_batch_norms(model) if fold_batch_norm else (copy.deepcopy(model), 0)
    finally:
        model.train(was_training)
    module.eval().requires_grad_(False)
    if channels_last and example.ndim == 4:
        module = _ChannelsLastInput(module.to(memory_format=torch.channels_last))
    max_pass = max_pass_size(module, example)
    if compile:
        module = torch.compile(module, dynamic=False)
    return ScoringModel(module=module, max_pass=max_pass, folded=folded)
