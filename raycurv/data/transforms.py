"""Tensor transforms: normalization (always) and crop + flip augmentation (training only)."""

from __future__ import annotations

import numpy as np
import torch

from raycurv.data import Normalization


def to_input(images: np.ndarray, norm: Normalization, *,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, C, H, W) raw images -> normalized float32 tensor (B, C, H, W)."""
    x = torch.tensor(images, device=device).float() / norm.scale  # a copy: object-store arrays are read-only
    m = torch.tensor(norm.mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(norm.std, device=device).view(1, -1, 1, 1)
    return (x - m) / s


def augment(x: torch.Tensor, *, generator: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` pixels, and a random horizontal flip if ``flip``.

    x: (B, C, H, W) normalized; returns the same shape. Vectorized: one gather for the batch.
    """
    batch, _, height, width = x.shape
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(x.device)
        rows = oy[:, None] + torch.arange(height, device=x.device)  # (B, H)
        cols = ox[:, None] + torch.arange(width, device=x.device)  # (B, W)
        b = torch.arange(batch, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(batch, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def crop_padding(height: int) -> int:
    """Padding for random crops: 4 pixels at 32x32 (the CIFAR recipe), scaled with image size."""
    return max(1, round(height / 8))
