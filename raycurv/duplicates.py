"""Duplicate images in a dataset: exact copies and near copies, grouped, with the groups whose
labels disagree marked as conflicting (the paper's most striking memorized samples: the same
picture carrying two labels, which a network can only fit by memorizing one of them).

Exact duplicates: identical pixel arrays (a BLAKE2 hash of the bytes, dtype and shape).

Near duplicates, in two stages:

1. candidates: for each image, the ``NEIGHBORS`` nearest images by Euclidean distance between
   *descriptors* (the magnitudes of the lowest ``KEEP`` x ``KEEP`` 2-D Fourier frequencies of the
   zero-mean image at working resolution, unit-norm: nearly blind to small shifts), queried
   once for the image itself and once for each copy of it shifted by up to ``MAX_SHIFT`` pixels,
   so a shifted copy meets its source exactly. A faiss index finds them: exact (flat) below
   ``EXACT_BELOW`` images, else approximate, an IVF index of the descriptors' first ``REDUCED``
   principal components with 4 sqrt(N) lists, each query searching its ``PROBE`` nearest lists
   (on bench/neardup.py's planted copies, searching one list already finds 99.8 % of them);
2. verification: the *aligned distance* of each candidate pair: at working resolution (images
   area-downsampled to at most ``WORK`` px a side), for every shift of up to ``MAX_SHIFT`` pixels
   each way, the two images' overlapping parts are made zero-mean and unit-norm and compared by
   Euclidean distance; the smallest over the shifts counts. A pair is a near duplicate when its
   aligned distance is at most ``threshold``. Each candidate is first bounded from below by
   *sketches* (for each image and shift, its unit overlap in the basis of ``GRID`` x ``GRID``
   block averages: a projection, which shortens every distance); those bounded above the
   threshold, nearly all, are dropped unmeasured, which changes no result.

Aligned distances lie in [0, 2]: 0 is the same picture up to a shift, brightness and contrast;
sqrt(2) is uncorrelated; d = sqrt(2 - 2 r) for the correlation r of the overlap, so the default
``NEAR_THRESHOLD`` = 0.15 means r >= 0.989. Measured when it was chosen: a copy shifted by one
pixel (zero fill) is found at distance 0; a copy with Gaussian noise of 3 % of the intensity
range lies at a median 0.077 (95th percentile 0.132) on Fashion-MNIST and 0.063 (0.077) on
digits; among distinct images, 16 pairs of Fashion-MNIST's 10k subset and 5 pairs of digits lie
within 0.15, all same-label images that look identical by eye (plain trousers, bags, ones),
while 1 % of nearest-neighbour pairs lie within 0.23. Pairs join into groups transitively
(connected components).

Memory: the images are read once, ``CHUNK`` at a time (an array, or a prepared dataset's
StoreImages: never the whole dataset at full resolution). Held for each image: its working image
(C h w bytes as uint8 where the images are uint8 and no larger than ``WORK``, else float16,
2 C h w bytes), its sketches (2 x 9 x C ``GRID``^2 bytes), its index row (4 ``REDUCED`` + 8
bytes; flat: 4 D, D = 66 C) and its hash (~90 bytes): ~4.2 kB for a 32 x 32 RGB image.

Cost: (2 ``MAX_SHIFT`` + 1)^2 = 9 index queries an image, O(N) each with the flat index and
O(sqrt(N)) with the IVF one, and an aligned distance only for the few candidates the sketches
leave. Measured with bench/neardup.py (synthetic 32 x 32 RGB images, 1 % near and 0.2 % exact
copies; one thread on a 2-core machine shared with another job, so the wall time is 1.7-2.5x
the CPU time): N = 50k in 60 s of CPU (101 s wall; the flat index 169 s, 298 s: the IVF index
2.8x less CPU, and the same 600 groups), 200k in 267 s of CPU (679 s wall), peak RSS 1.3 and
1.95 GB, every planted copy found.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import faiss
import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch.nn import functional as F

KEEP = 6  # Fourier frequencies per axis in the candidate descriptor
WORK = 32  # working resolution for the aligned distance
MAX_SHIFT = 1  # pixels (at working resolution) tried in each direction
NEIGHBORS = 10  # candidates per image
NEAR_THRESHOLD = 0.15  # aligned distance at or below which two images are near duplicates
CHUNK = 4096  # images read, described or searched at a time
EXACT_BELOW = 50_000  # below this many images the neighbour index is exact (flat); else IVF
PROBE = 8  # inverted lists an IVF query searches (1 already finds 99.8 % of near copies)
TRAIN_PER_LIST = 40  # IVF training descriptors per list (a seeded sample of the dataset)
TRAIN_ROUNDS = 10  # k-means rounds of the IVF's coarse quantizer
REDUCED = 48  # dimensions the IVF index keeps of the descriptors (PCA)
GRID = 4  # blocks a side of the sketches that bound the aligned distance from below
MARGIN = 0.01  # float16 rounding allowed for in the lower bound


class Images(Protocol):
    """N images sliced in chunks: ``len()`` and ``[a:b]`` -> (b - a, C, H, W) array (an ndarray,
    or raycurv.data.plane.StoreImages, which reads only the rows asked for)."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> np.ndarray: ...


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


def _work_dtype(first: np.ndarray, side: int) -> torch.dtype:
    """uint8 where that holds the working images exactly (uint8 images no larger than ``side``:
    kept as they are), else float16 (area-downsampled, divided by the scale). first: (1, C, H, W)."""
    return torch.uint8 if first.dtype == np.uint8 and max(first.shape[2:]) <= side else torch.float16


def _floats(raw: np.ndarray) -> torch.Tensor:
    """``raw`` as a float32 tensor; a read-only array (the object store's) is copied, not shared."""
    return torch.from_numpy(np.require(raw, np.float32, ["W"]))


def scan(images: Images, scale: float, *, side: int = WORK,
         chunk: int = CHUNK) -> tuple[np.ndarray, torch.Tensor]:
    """One pass over ``images`` (N, C, H, W), ``chunk`` at a time: their pixel hashes (N,) and
    their working images (N, C, h, w), h, w <= side, held as uint8 (C h w bytes an image) or
    float16 (2 C h w bytes), see ``_work_dtype``. The aligned distance and the descriptors are
    blind to brightness and contrast, so the scale only keeps float16 in range."""
    first = np.asarray(images[0:1])
    dtype = _work_dtype(first, side)
    divisor = 1.0 if dtype == torch.uint8 else scale
    shape = _resize(_floats(first), side).shape[1:]
    hashes = np.empty(len(images), dtype=object)
    work = torch.empty((len(images), *shape), dtype=dtype)
    for start in range(0, len(images), chunk):
        raw = np.asarray(images[start:start + chunk])
        hashes[start:start + len(raw)] = pixel_hashes(raw)
        work[start:start + len(raw)] = _resize(_floats(raw) / divisor, side).to(dtype)
    return hashes, work


def working_images(images: Images, scale: float, *, side: int = WORK) -> torch.Tensor:
    """(N, C, H, W) raw images -> (N, C, h, w) working images, h, w <= side (see ``scan``)."""
    return scan(images, scale, side=side)[1]


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


def descriptors(work: torch.Tensor, *, keep: int = KEEP,
                shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(B, C, h, w) working images -> (B, D) float32 unit vectors, D = C (2 keep - 1) keep: the
    low-frequency Fourier magnitudes of each image, optionally shifted by ``shift`` pixels first
    (translation-tolerant; used to find candidates only)."""
    return _unit(_spectrum(shift_image(work.float(), *shift), keep)).numpy()


def _shifts(max_shift: int) -> list[tuple[int, int]]:
    r = range(-max_shift, max_shift + 1)
    return [(dy, dx) for dy in r for dx in r]


def _shift_range(work: torch.Tensor, max_shift: int) -> tuple[int, int]:
    """The largest shift (rows, columns) that leaves an overlap: at most ``max_shift``."""
    h, w = work.shape[2:]
    return min(max_shift, h - 1), min(max_shift, w - 1)


def _aligned(a: torch.Tensor, b: torch.Tensor, my: int, mx: int) -> torch.Tensor:
    """(B,) aligned distances of a[k] and b[k], (B, C, h, w) float64, over the shifts up to
    (my, mx): the correlation of the overlaps from their sums, sums of squares and cross sums
    (a grouped convolution), so the distance is sqrt(2 - 2 r); a constant overlap's unit
    version is 0 (distance 1 to any other, 0 to another constant one)."""
    a, b = a - a.mean((1, 2, 3), keepdim=True), b - b.mean((1, 2, 3), keepdim=True)
    n, c, h, w = a.shape
    ones = torch.ones(1, 1, h, w, dtype=a.dtype)

    def over(x: torch.Tensor) -> torch.Tensor:  # (n, 1, h, w) -> (n, 2my+1, 2mx+1) overlap sums
        return F.conv2d(x, ones, padding=(my, mx))[:, 0]

    count = c * over(torch.ones_like(ones))
    cross = F.conv2d(a.reshape(1, n * c, h, w), b, padding=(my, mx), groups=n)[0]
    sa, qa = over(a.sum(1, keepdim=True)), over((a * a).sum(1, keepdim=True))
    sb, qb = over(b.sum(1, keepdim=True)).flip(1, 2), over((b * b).sum(1, keepdim=True)).flip(1, 2)
    va, vb = qa - sa * sa / count, qb - sb * sb / count
    flat_a, flat_b = va <= 1e-11 * qa, vb <= 1e-11 * qb
    r = (cross - sa * sb / count) / (va * vb).clamp_min(1e-300).sqrt()
    square = torch.where(flat_a | flat_b, (flat_a != flat_b).to(a.dtype), 2 - 2 * r).clamp_min(0)
    return square.flatten(1).amin(1).sqrt()


def aligned_distance(work: torch.Tensor, pairs: np.ndarray, *, max_shift: int = MAX_SHIFT,
                     chunk: int = 1024) -> np.ndarray:
    """(P,) for each row (i, j) of ``pairs`` (P, 2): the smallest distance between the unit
    (zero-mean, unit-norm) versions of work[i] and work[j] over their overlap when work[j] is
    shifted by up to ``max_shift`` pixels each way. work: (N, C, h, w) images at working size.
    Computed in float64, ``chunk`` pairs at a time."""
    out = np.empty(len(pairs), dtype=np.float32)
    my, mx = _shift_range(work, max_shift)
    for start in range(0, len(pairs), chunk):
        p = torch.as_tensor(pairs[start:start + chunk])
        out[start:start + len(p)] = _aligned(work[p[:, 0]].double(), work[p[:, 1]].double(),
                                             my, mx).numpy()
    return out


def _bounds(start: int, stop: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The edges (grid + 1,) of ``grid`` near-equal runs that split [start, stop), and the runs'
    lengths (grid,)."""
    edges = torch.as_tensor([start, *(run[-1] + 1 for run in
                                      np.array_split(np.arange(start, stop), grid))])
    return edges, edges.diff().double()


def _rectangles(integral: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(..., R-1, K-1) sums of the rectangles between consecutive ``rows`` (R,) and ``cols``
    (K,) edges, from the integral images (..., h + 1, w + 1)."""
    c = integral[..., rows, :][..., cols]
    return c[..., 1:, 1:] - c[..., :-1, 1:] - c[..., 1:, :-1] + c[..., :-1, :-1]


def _sketch(integral: torch.Tensor, squares: torch.Tensor, dy: int, dx: int,
            grid: int) -> torch.Tensor:
    """(B, C g g) float64: the part of each image that aligned_distance compares at shift
    (dy, dx) (rows from max(dy, 0), columns from max(dx, 0)), made unit (0 where constant, as
    there), in the orthonormal basis of its g x g blocks (each block's indicator over the square
    root of its size). integral: (B, C, h + 1, w + 1) integral images of the zero-mean images;
    squares: (B, h + 1, w + 1) that of their squares summed over the channels."""
    h, w = integral.shape[2] - 1, integral.shape[3] - 1
    rows, heights = _bounds(max(dy, 0), h + min(dy, 0), grid)
    cols, widths = _bounds(max(dx, 0), w + min(dx, 0), grid)
    blocks = _rectangles(integral, rows, cols)  # (B, C, g, g)
    size = heights[:, None] * widths[None, :]
    count = integral.shape[1] * size.sum()
    total = blocks.sum((1, 2, 3))
    square = _rectangles(squares, rows[[0, -1]], cols[[0, -1]]).flatten()
    var = square - total * total / count
    mean = (total / count)[:, None, None, None]
    coords = ((blocks - mean * size) / size.sqrt()).flatten(1)
    return torch.where((var > 1e-11 * square)[:, None],
                       coords / var.clamp_min(1e-300).sqrt()[:, None], 0.0)


def _integral(x: torch.Tensor) -> torch.Tensor:
    """(..., h, w) -> (..., h + 1, w + 1) integral images (a zero first row and column)."""
    return F.pad(x.cumsum(-2).cumsum(-1), (1, 0, 1, 0))


def sketches(work: torch.Tensor, *, max_shift: int = MAX_SHIFT, grid: int = GRID,
             chunk: int = CHUNK) -> torch.Tensor:
    """(N, S, C g g) float16, S = (2 my + 1)(2 mx + 1) shifts (``_shift_range``, row-major),
    g = min(grid, h - my, w - mx): for each image and shift, ``_sketch``. The distance of the
    sketches of i at shift s and of j at -s is the length of an orthogonal projection of the
    difference of the unit vectors aligned_distance compares at s, so at most their distance:
    see ``lower_bound``. 2 S C g g bytes an image (864 for RGB at the defaults)."""
    h, w = work.shape[2:]
    my, mx = _shift_range(work, max_shift)
    grid = min(grid, h - my, w - mx)
    out = torch.empty((len(work), (2 * my + 1) * (2 * mx + 1), work.shape[1] * grid * grid),
                      dtype=torch.float16)
    for start in range(0, len(work), chunk):
        x = work[start:start + chunk].double()
        x = x - x.mean((1, 2, 3), keepdim=True)
        integral, squares = _integral(x), _integral((x * x).sum(1))
        out[start:start + len(x)] = torch.stack(
            [_sketch(integral, squares, dy, dx, grid)
             for dy in range(-my, my + 1) for dx in range(-mx, mx + 1)], dim=1).half()
    return out


def lower_bound(sketch: torch.Tensor, pairs: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
    """(P,) a lower bound of the aligned distance of each pair (i, j) (P, 2): the smallest over
    the shifts s of |sketch[i, s] - sketch[j, -s]| (``sketches``), up to their float16
    rounding (below ``MARGIN`` for unit vectors)."""
    out = np.empty(len(pairs), dtype=np.float32)
    for start in range(0, len(pairs), chunk):
        p = torch.as_tensor(pairs[start:start + chunk])
        diff = sketch[p[:, 0]].float() - sketch[p[:, 1]].float().flip(1)
        out[start:start + len(p)] = (diff * diff).sum(2).amin(1).sqrt().numpy()
    return out


def _valid_descriptors(work: torch.Tensor, *,
                       shift: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """(rows (B',), descriptors (B', D)) of the non-constant images of ``work`` (B, C, h, w)
    (a constant image has a zero descriptor)."""
    desc = descriptors(work, shift=shift)
    valid = np.flatnonzero(np.abs(desc).sum(1) > 0)
    return valid, desc[valid]


def _sample_descriptors(work: torch.Tensor, size: int, *, chunk: int, seed: int) -> np.ndarray:
    """(<= size, D) descriptors of a seeded random sample of the non-constant ``work`` images."""
    sample = np.sort(np.random.default_rng(seed).permutation(len(work))[:size])
    return np.concatenate([_valid_descriptors(work[torch.as_tensor(rows)])[1]
                           for rows in np.array_split(sample, -(-len(sample) // chunk))])


def build_index(work: torch.Tensor, *, exact_below: int = EXACT_BELOW, probe: int = PROBE,
                chunk: int = CHUNK, seed: int = 0) -> tuple[faiss.Index, np.ndarray]:
    """A nearest-neighbour index of the descriptors of the non-constant ``work`` images and the
    position (M,) of each of its rows. Below ``exact_below`` images: exact (flat L2, O(N) a
    query, 4 D bytes an image); else an IVF index of their first ``REDUCED`` principal components
    (a near copy is near its source in any projection; 4 REDUCED + 8 bytes an image) with
    4 sqrt(N) lists (at most N / ``TRAIN_PER_LIST``), trained on a seeded sample of
    ``TRAIN_PER_LIST`` descriptors a list (``TRAIN_ROUNDS`` k-means rounds), each query
    searching the ``probe`` lists nearest it."""
    dim = descriptors(work[:1]).shape[1]
    if len(work) < exact_below:
        index = faiss.IndexFlatL2(dim)
    else:
        lists = max(1, min(round(4 * math.sqrt(len(work))), len(work) // TRAIN_PER_LIST))
        reduced = min(dim, REDUCED)
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(reduced), reduced, lists)
        ivf.cp.niter = TRAIN_ROUNDS
        ivf.nprobe = min(probe, lists)
        index = faiss.IndexPreTransform(faiss.PCAMatrix(dim, reduced), ivf)
        index.train(_sample_descriptors(work, TRAIN_PER_LIST * lists, chunk=chunk, seed=seed))
    positions = []
    for start in range(0, len(work), chunk):
        valid, desc = _valid_descriptors(work[start:start + chunk])
        index.add(desc)
        positions.append(start + valid)
    return index, np.concatenate(positions)


def candidate_chunks(work: torch.Tensor, *, neighbors: int = NEIGHBORS,
                     max_shift: int = MAX_SHIFT, exact_below: int = EXACT_BELOW,
                     probe: int = PROBE, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """For each ``chunk`` of the working images ``work`` (N, C, h, w) in turn, the (P, 2) unique
    pairs i < j where i or j is in the chunk and the other is among its ``neighbors`` nearest
    descriptors when it is shifted by any of up to ``max_shift`` pixels each way (so a shifted
    copy meets its source exactly); nearest as ``build_index``'s index finds them (exact below
    ``exact_below`` images, approximate above). Constant images take no part. A pair may come
    again in a later chunk."""
    index, positions = build_index(work, exact_below=exact_below, probe=probe, chunk=chunk)
    k = min(neighbors + 1, len(positions))
    n = len(work)
    for start in range(0, n if k > 1 else 0, chunk):
        keys = []
        for shift in _shifts(max_shift):
            valid, desc = _valid_descriptors(work[start:start + chunk], shift=shift)
            _, rows = index.search(desc, k)
            found = rows >= 0  # an IVF query may find fewer than k
            i, j = np.repeat(start + valid, k)[found.ravel()], positions[rows[found]]
            keys.append(np.minimum(i, j) * n + np.maximum(i, j))
        keys = np.unique(np.concatenate(keys))
        pairs = np.stack([keys // n, keys % n], axis=1)
        yield pairs[pairs[:, 0] != pairs[:, 1]]


def candidate_pairs(work: torch.Tensor, **options) -> np.ndarray:
    """(P, 2) the unique pairs of all of ``candidate_chunks(work, **options)``."""
    return np.unique(np.concatenate([np.empty((0, 2), dtype=np.int64),
                                     *candidate_chunks(work, **options)]), axis=0)


def exact_pairs(hashes: np.ndarray) -> np.ndarray:
    """(P, 2) pairs linking every image to the first image with the same hash."""
    _, first, inverse = np.unique(hashes.astype(str), return_index=True, return_inverse=True)
    head = first[inverse]
    rows = np.flatnonzero(head != np.arange(len(hashes)))
    return np.stack([head[rows], rows], axis=1).astype(np.int64)


def near_pairs(work: torch.Tensor, *, threshold: float = NEAR_THRESHOLD,
               neighbors: int = NEIGHBORS, exact_below: int = EXACT_BELOW,
               probe: int = PROBE) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicate pairs (P, 2) among the working images ``work`` (N, C, h, w) and their
    aligned distances (P,), distance <= threshold. Candidates (``candidate_chunks``) whose
    ``lower_bound`` exceeds the threshold are dropped as they come, unmeasured: that changes no
    result, and only the few left are held and measured."""
    sketch = sketches(work)
    kept = [p[lower_bound(sketch, p) <= threshold + MARGIN]
            for p in candidate_chunks(work, neighbors=neighbors, exact_below=exact_below,
                                      probe=probe)]
    pairs = np.unique(np.concatenate([np.empty((0, 2), dtype=np.int64), *kept]), axis=0)
    dist = aligned_distance(work, pairs)
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


def find_duplicates(images: Images, labels: np.ndarray, *, scale: float,
                    threshold: float = NEAR_THRESHOLD, neighbors: int = NEIGHBORS,
                    exact_below: int = EXACT_BELOW, probe: int = PROBE) -> Duplicates:
    """Group exact and near duplicates among ``images`` (N, C, H, W; an array or anything sliced
    in chunks, see ``Images``) with ``labels`` (N,). The images are read once, ``CHUNK`` at a
    time; what is held is their working images and hashes (``scan``) and the neighbour index
    (4 D bytes an image, D = C (2 KEEP - 1) KEEP)."""
    hashes, work = scan(images, scale)
    near, _ = near_pairs(work, threshold=threshold, neighbors=neighbors, exact_below=exact_below,
                         probe=probe)
    group = group_pairs(len(images), np.concatenate([exact_pairs(hashes), near]))
    grouped = np.flatnonzero(group >= 0)
    grouped = grouped[np.argsort(group[grouped], kind="stable")]
    cuts = np.flatnonzero(np.diff(group[grouped])) + 1
    groups = []
    for gid, members in enumerate(np.split(grouped, cuts) if len(grouped) else []):
        kind = "exact" if len(set(hashes[members])) == 1 else "near"
        groups.append(Group(gid, members, labels[members], kind, len(set(labels[members])) > 1))
    return Duplicates(group=group, groups=groups, threshold=threshold)
