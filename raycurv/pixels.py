"""A sample's pixels as a person sees them: a dataset's (C, H, W) array (raw values, ``scale``
meaning white) as a PIL image, resized for display, and as PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_image(image: np.ndarray, scale: float) -> Image.Image:
    """One (C, H, W) image with values in [0, scale] as an 8-bit grey (C = 1) or RGB image (the
    first three channels otherwise)."""
    pixels = np.clip(np.asarray(image, dtype=np.float64) / scale * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels[:3].transpose(1, 2, 0))


def resized(img: Image.Image, side: int) -> Image.Image:
    """``img`` with its longer side ``side`` pixels: nearest-neighbour when enlarging (pixels stay
    crisp), box filter when shrinking."""
    factor = side / max(img.size)
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    if size == img.size:
        return img
    return img.resize(size, Image.NEAREST if factor > 1 else Image.BOX)


def png_bytes(image: np.ndarray, scale: float, side: int | None = None) -> bytes:
    """PNG of one (C, H, W) image, its longer side ``side`` pixels (native size when None)."""
    img = to_image(image, scale)
    if side is not None:
        img = resized(img, side)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
