"""Duplicate detection on images the test constructs: exact copies, copies shifted by a pixel and
slightly noised copies are found and grouped; distinct images are not; groups whose labels
disagree are marked; injected copies are found in their source's group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from raycurv.duplicates import (
    NEAR_THRESHOLD,
    aligned_distance,
    find_duplicates,
    group_pairs,
    working_images,
)
from raycurv.evaluate import duplicate_metrics


def smooth_images(n: int, side: int = 28, seed: int = 0) -> np.ndarray:
    """(n, 1, side, side) uint8: distinct random smooth textures (blurred noise), full range."""
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(n, 1, side, side)), dtype=torch.float32)
    x = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    return (x.numpy() * 255).round().astype(np.uint8)


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift (C, H, W) by (dy, dx) pixels, filling with zeros."""
    out = np.zeros_like(image)
    h, w = image.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


@pytest.fixture(scope="module")
def constructed():
    """60 distinct images, then: an exact copy of 0 (other label), a copy of 1 shifted by a
    pixel (same label), a copy of 2 shifted diagonally (other label), a noised copy of 3."""
    rng = np.random.default_rng(1)
    base = smooth_images(60)
    labels = rng.integers(0, 5, 60)
    noised = np.clip(base[3] + rng.normal(0, 0.02 * 255, base[3].shape), 0, 255).astype(np.uint8)
    extra = np.stack([base[0], shifted(base[1], 0, 1), shifted(base[2], 1, 1), noised])
    extra_labels = np.array([(labels[0] + 1) % 5, labels[1], (labels[2] + 2) % 5, labels[3]])
    return np.concatenate([base, extra]), np.concatenate([labels, extra_labels])


def test_copies_found_and_distinct_images_not(constructed):
    images, labels = constructed
    dups = find_duplicates(images, labels, scale=255.0)
    found = {tuple(g.members.tolist()): g for g in dups.groups}
    assert set(found) == {(0, 60), (1, 61), (2, 62), (3, 63)}
    assert found[(0, 60)].kind == "exact" and found[(0, 60)].conflicting
    assert found[(1, 61)].kind == "near" and not found[(1, 61)].conflicting
    assert found[(2, 62)].conflicting and not found[(3, 63)].conflicting
    assert (dups.group[4:60] == -1).all()
    assert dups.in_conflicting_group().sum() == 4


def test_distances_are_separated(constructed):
    images, _ = constructed
    work = working_images(images, 255.0)
    copies = aligned_distance(work, np.array([[0, 60], [1, 61], [2, 62], [3, 63]]))
    assert copies[:3] == pytest.approx(0.0, abs=1e-5) and copies[3] < NEAR_THRESHOLD
    pairs = np.array([(i, j) for i in range(60) for j in range(i + 1, 60)])
    assert aligned_distance(work, pairs).min() > 2 * NEAR_THRESHOLD


def test_float_images_and_small_images():
    images = smooth_images(30, side=8, seed=3).astype(np.float32) / 255
    images = np.concatenate([images, images[:1], shifted(images[1], 1, 0)[None]])
    dups = find_duplicates(images, np.zeros(32, dtype=np.int64), scale=1.0)
    assert {tuple(g.members.tolist()) for g in dups.groups} == {(0, 30), (1, 31)}
    assert not any(g.conflicting for g in dups.groups)


def test_constant_images_only_match_exactly():
    images = np.concatenate([np.full((2, 1, 8, 8), 7, np.uint8), np.full((1, 1, 8, 8), 9, np.uint8)])
    dups = find_duplicates(images, np.array([0, 1, 1]), scale=255.0)
    assert [g.members.tolist() for g in dups.groups] == [[0, 1]] and dups.groups[0].conflicting


def test_groups_are_transitive_and_numbered_in_order():
    group = group_pairs(7, np.array([[5, 6], [1, 2], [2, 4]]))
    assert group.tolist() == [-1, 0, 0, -1, 0, 1, 1]
    assert group_pairs(3, np.empty((0, 2), dtype=np.int64)).tolist() == [-1, -1, -1]


def test_duplicate_metrics_rank_the_conflicting_groups(constructed):
    images, labels = constructed
    dups = find_duplicates(images, labels, scale=255.0)
    n = len(labels)
    curvature = np.linspace(0, 1, n)[::-1].copy()  # position 0 highest
    columns = {"sample_id": np.arange(n), "label": labels, "curvature": curvature,
               "duplicate_of": np.r_[np.full(60, -1), [0, 1, 2, 3]]}
    m = duplicate_metrics(dups, columns, top_share=0.1)
    assert m["groups"] == 4 and m["exact_groups"] == 1 and m["conflicting_groups"] == 2
    assert m["injected"] == {"copies": 4, "found": 1.0}
    r = m["ranking"]["curvature"]
    assert r["groups_with_member_in_top"] == 1.0  # positions 0 and 2 are in the top 10 %
    assert r["members_in_top"] == 0.5
    assert m["conflicting"][0]["sample_ids"] == [0, 60]
    assert m["conflicting"][0]["curvature_ranks"] == [1, 61]


def test_approximate_index_finds_the_exact_index_groups():
    """3000 distinct images with 40 copies shifted by up to a pixel and noised (1 %) and 20
    exact copies: the IVF path (forced by exact_below=0) finds the same groups as the flat path,
    every planted copy among them."""
    rng = np.random.default_rng(5)
    base = smooth_images(3000, seed=4)
    sources = rng.choice(len(base), 60, replace=False)
    near = [np.clip(shifted(base[s], *rng.choice([-1, 0, 1], 2))
                    + rng.normal(0, 0.01 * 255, base[s].shape), 0, 255).astype(np.uint8)
            for s in sources[:40]]
    images = np.concatenate([base, np.stack(near), base[sources[40:]]])
    labels = np.zeros(len(images), dtype=np.int64)
    exact = find_duplicates(images, labels, scale=255.0)
    approx = find_duplicates(images, labels, scale=255.0, exact_below=0)
    groups = {tuple(g.members.tolist()) for g in approx.groups}
    assert groups == {tuple(g.members.tolist()) for g in exact.groups}
    copies = np.arange(len(base), len(images))
    assert (approx.group[copies] >= 0).all() and (approx.group[copies] == approx.group[sources]).all()
