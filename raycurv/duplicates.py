"""Duplicate images in a dataset: exact copies and near copies, grouped, with the groups whose
labels disagree marked as conflicting (the paper's most striking memorized samples: the same
picture carrying two labels, which a network can only fit by memorizing one of them).

Exact duplicates: identical pixel arrays (a BLAKE2 hash of the bytes, dtype and shape).

Near duplicates, in two stages:

1. candidates: for each image, the ``NEIGHBORS`` nearest images by Euclidean distance between
   *descriptors* (the magnitudes of the lowest ``KEEP`` x ``KEEP`` 2-D Fourier frequencies of the
   zero-mean image at working resolution, unit-norm: nearly blind to small shifts), queried
   once for the image itself and once for each copy of it shifted by up to ``MAX_SHIFT`` pixels,
   so a shifted copy meets its source exactly;
2. verification: the *aligned distance* of each candidate pair: at working resolution (images
   area-downsampled to at most ``WORK`` px a side), for every shift of up to ``MAX_SHIFT`` pixels
   each way, the two images' overlapping parts are made zero-mean and unit-norm and compared by
   Euclidean distance; the smallest over the shifts counts. A pair is a near duplicate when its
   aligned distance is at most ``threshold``.

Aligned distances lie in [0, 2]: 0 is the same picture up to a shift, brightness and contrast;
sqrt(2) is uncorrelated; d = sqrt(2 - 2 r) for the correlation r of the overlap, so the default
``NEAR_THRESHOLD`` = 0.15 means r >= 0.989. Measured when it was chosen: a copy shifted by one
pixel (zero fill) is found at distance 0; a copy with Gaussian noise of 3 % of the intensity
range lies at a median 0.077 (95th percentile 0.132) on Fashion-MNIST and 0.063 (0.077) on
digits; among distinct images, 16 pairs of Fashion-MNIST's 10k subset and 5 pairs of digits lie
within 0.15, all same-label images that look identical by eye (plain trousers, bags, ones),
while 1 % of nearest-neighbour pairs lie within 0.23. Pairs join into groups transitively
(connected components). Cost: ~ (2 MAX_SHIFT + 1)^2 nearest-neighbour queries over N images
(brute force, O(N^2)): seconds for 10k images, minutes for 100k.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors
from torch.nn import functional as F

KEEP = 6  # Fourier frequencies per axis in the candidate descriptor
WORK = 32  # working resolution for the aligned distance
MAX_SHIFT = 1  # pixels (at working resolution) tried in each direction
NEIGHBORS = 10  # candidates per image
NEAR_THRESHOLD = 0.15  # aligned distance at or below which two images are near duplicates


@dataclass
class Group:
    """A set of images that are copies of each other: positions in the dataset, their labels."""

    id: int
    members: np.ndarray  # (G,) positions, increasing
    labels: np.ndarray  # (G,) the labels trained on
    kind: str  # "exact": all members have identical pixels; else "near"
    conflicting: bool  # the members' labels disagree


@dataclass
class Duplicates:
    """All groups of a dataset; ``group[i]`` is the group id of position i, -1 if none."""

    group: np.ndarray  # (N,) int64
    groups: list[Group] = field(default_factory=list)
    threshold: float = NEAR_THRESHOLD

    @property
    def conflicting(self) -> list[Group]:
        return [g for g in self.groups if g.conflicting]

    def in_conflicting_group(self) -> np.ndarray:
        """(N,) bool: the sample belongs to a group whose labels disagree."""
        mask = np.zeros(len(self.group), dtype=bool)
        for g in self.conflicting:
            mask[g.members] = True
        return mask


def pixel_hashes(images: np.ndarray) -> np.ndarray:
    """(N,) object array of hex digests of each image's bytes (with its dtype and shape)."""
    head = f"{images.dtype.str}{images.shape[1:]}".encode()
    return np.array([hashlib.blake2b(head + np.ascontiguousarray(img).tobytes(), digest_size=16)
                     .hexdigest() for img in images], dtype=object)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D): flattened, zero-mean and unit-norm per image (constant images: 0)."""
    x = x.flatten(1)
    x = x - x.mean(1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 1e-8, x / norm.clamp_min(1e-12), torch.zeros_like(x))


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Area-downsample (B, C, H, W) so neither side exceeds ``side``; smaller images are kept."""
    h, w = x.shape[2:]
    if max(h, w) <= side:
        return x
    scale = side / max(h, w)
    return F.adaptive_avg_pool2d(x, (max(1, round(h * scale)), max(1, round(w * scale))))


def _chunks(images: np.ndarray, scale: float, size: int = 4096):
    for start in range(0, len(images), size):
        yield torch.tensor(np.asarray(images[start:start + size]), dtype=torch.float32) / scale


def _spectrum(x: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2*keep-1, keep) magnitudes of the lowest 2-D Fourier frequencies
    (both signs vertically, non-negative horizontally); a shift of the image leaves them
    unchanged but for what crosses the border."""
    f = torch.fft.rfft2(x - x.mean((2, 3), keepdim=True)).abs()
    height = f.shape[2]
    rows = [*range(min(keep, height)), *range(max(keep, height - keep + 1), height)]
    return f[:, :, rows, :keep]


def shift_image(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(B, C, H, W) shifted by (dy, dx) pixels (down, right), zero fill."""
    out = torch.zeros_like(x)
    h, w = x.shape[2:]
    out[:, :, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, :, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def descriptors(images: np.ndarray, scale: float, keep: int = KEEP,
                shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(N, C, H, W) raw images -> (N, D) float32 unit vectors: the low-frequency Fourier
    magnitudes of each image at working resolution, optionally shifted by ``shift`` pixels first
    (translation-tolerant; used to find candidates only)."""
    return torch.cat([_unit(_spectrum(shift_image(_resize(x, WORK), *shift), keep))
                      for x in _chunks(images, scale)]).numpy()


def _shifts(max_shift: int) -> list[tuple[int, int]]:
    r = range(-max_shift, max_shift + 1)
    return [(dy, dx) for dy in r for dx in r]


def working_images(images: np.ndarray, scale: float, side: int = WORK) -> torch.Tensor:
    """(N, C, H, W) raw images -> (N, C, h, w) float32 in [0, 1], h, w <= side."""
    out = [_resize(x, side) for x in _chunks(images, scale)]
    return torch.cat(out)


def aligned_distance(work: torch.Tensor, pairs: np.ndarray, max_shift: int = MAX_SHIFT,
                     chunk: int = 4096) -> np.ndarray:
    """(P,) for each row (i, j) of ``pairs`` (P, 2): the smallest distance between the unit
    (zero-mean, unit-norm) versions of work[i] and work[j] over their overlap when work[j] is
    shifted by up to ``max_shift`` pixels each way. work: (N, C, h, w) images at working size."""
    out = np.empty(len(pairs), dtype=np.float32)
    h, w = work.shape[2:]
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)
              if abs(dy) < h and abs(dx) < w]
    for start in range(0, len(pairs), chunk):
        p = torch.as_tensor(pairs[start:start + chunk])
        a, b = work[p[:, 0]], work[p[:, 1]]
        best = torch.full((len(p),), float("inf"))
        for dy, dx in shifts:
            crop_a = a[:, :, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
            crop_b = b[:, :, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            best = torch.minimum(best, (_unit(crop_a) - _unit(crop_b)).norm(dim=1))
        out[start:start + len(p)] = best.numpy()
    return out


def candidate_pairs(images: np.ndarray, scale: float, neighbors: int = NEIGHBORS,
                    max_shift: int = MAX_SHIFT) -> np.ndarray:
    """(P, 2) unique pairs i < j where j is among the ``neighbors`` nearest descriptors of image
    i shifted by any of up to ``max_shift`` pixels each way (so a shifted copy meets its source
    exactly), or the reverse. Constant images (zero descriptor) take no part."""
    base = descriptors(images, scale)
    valid = np.flatnonzero(np.abs(base).sum(1) > 0)
    if len(valid) < 2:
        return np.empty((0, 2), dtype=np.int64)
    k = min(neighbors + 1, len(valid))
    index = NearestNeighbors(n_neighbors=k).fit(base[valid])
    found = []
    for shift in _shifts(max_shift):
        query = base if shift == (0, 0) else descriptors(images, scale, shift=shift)
        _, idx = index.kneighbors(query[valid])
        found.append(np.stack([np.repeat(valid, k), valid[idx.ravel()]], axis=1))
    pairs = np.concatenate(found)
    pairs = np.stack([pairs.min(1), pairs.max(1)], axis=1)
    return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)


def exact_pairs(hashes: np.ndarray) -> np.ndarray:
    """(P, 2) pairs linking every image to the first image with the same hash."""
    _, first, inverse = np.unique(hashes.astype(str), return_index=True, return_inverse=True)
    head = first[inverse]
    rows = np.flatnonzero(head != np.arange(len(hashes)))
    return np.stack([head[rows], rows], axis=1).astype(np.int64)


def near_pairs(images: np.ndarray, scale: float, *, threshold: float = NEAR_THRESHOLD,
               neighbors: int = NEIGHBORS) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicate pairs (P, 2) and their aligned distances (P,), distance <= threshold."""
    pairs = candidate_pairs(images, scale, neighbors)
    if not len(pairs):
        return pairs, np.empty(0, dtype=np.float32)
    dist = aligned_distance(working_images(images, scale), pairs)
    keep = dist <= threshold
    return pairs[keep], dist[keep]


def group_pairs(n: int, pairs: np.ndarray) -> np.ndarray:
    """(N,) group id per position from linking ``pairs`` transitively; -1 for a singleton.
    Group ids are numbered 0.. in the order of each group's first member."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    group = np.full(n, -1, dtype=np.int64)
    multi = sizes[component] > 1
    _, first = np.unique(component[multi], return_index=True)
    order = np.argsort(first)  # number groups by their first member's position
    remap = np.empty(len(first), dtype=np.int64)
    remap[order] = np.arange(len(first))
    group[multi] = remap[np.unique(component[multi], return_inverse=True)[1]]
    return group


def find_duplicates(images: np.ndarray, labels: np.ndarray, *, scale: float,
                    threshold: float = NEAR_THRESHOLD, neighbors: int = NEIGHBORS) -> Duplicates:
    """Group exact and near duplicates among ``images`` (N, C, H, W) with ``labels`` (N,)."""
    hashes = pixel_hashes(images)
    near, _ = near_pairs(images, scale, threshold=threshold, neighbors=neighbors)
    group = group_pairs(len(images), np.concatenate([exact_pairs(hashes), near]))
    grouped = np.flatnonzero(group >= 0)
    grouped = grouped[np.argsort(group[grouped], kind="stable")]
    cuts = np.flatnonzero(np.diff(group[grouped])) + 1
    groups = []
    for gid, members in enumerate(np.split(grouped, cuts) if len(grouped) else []):
        kind = "exact" if len(set(hashes[members])) == 1 else "near"
        groups.append(Group(gid, members, labels[members], kind, len(set(labels[members])) > 1))
    return Duplicates(group=group, groups=groups, threshold=threshold)
