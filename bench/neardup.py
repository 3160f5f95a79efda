"""Cost of the near-duplicate search (raycurv.duplicates.find_duplicates) as N grows, on
synthetic 32x32x3 uint8 images: smooth random pictures (8x8 Gaussian noise upsampled, high
contrast), so distinct images are far apart, with ``--near`` of them near copies of another
(shifted by one pixel, zero fill, plus Gaussian noise of ``--noise`` of the intensity range) and
``--exact`` exact copies.

    python -m bench.neardup [--sizes 50000,500000 --threads 1]

The images are generated chunk by chunk as the search reads them (like a prepared dataset's
StoreImages), never held whole. Each N runs in a fresh process, which prints the search's wall
time, its peak RSS (ru_maxrss) and the recall of the planted pairs (source and copy in one group);
at the smallest N the exact (flat) index runs too, for the speed ratio and the agreement of the
groups (share of the exact path's groups found identically). Writes nothing. The last line is a
JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

GB = 1024**3
SIDE, LOW, CHANNELS = 32, 8, 3


class SyntheticImages:
    """N images (N, 3, 32, 32) uint8 sliced like an array, made on demand from the seed: row r
    < ``originals`` is a picture of its own; each later row copies ``source[r]`` (near: shifted
    by one pixel and noised; exact: the same pixels)."""

    def __init__(self, n: int, *, near: float, exact: float, noise: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        copies = int(n * near), int(n * exact)
        self.originals = n - sum(copies)
        self.n, self.noise, self.seed = n, noise, seed
        self.source = np.r_[np.arange(self.originals),
                            rng.choice(self.originals, sum(copies), replace=False)]
        self.near = np.r_[np.zeros(self.originals, bool), np.ones(copies[0], bool),
                          np.zeros(copies[1], bool)]
        self.shift = rng.choice([-1, 1], size=(n, 2)) * (rng.random((n, 2)) < 0.7)

    def __len__(self) -> int:
        return self.n

    def _pictures(self, sources: np.ndarray) -> torch.Tensor:
        """(B, 3, 32, 32) float in [0, 1] of the pictures ``sources`` (B,)."""
        low = np.stack([np.random.default_rng([self.seed, s]).normal(size=(CHANNELS, LOW, LOW))
                        for s in sources])
        x = F.interpolate(torch.as_tensor(low, dtype=torch.float32), size=(SIDE, SIDE),
                          mode="bicubic", align_corners=False)
        x = (x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True)
        return (0.5 + 0.3 * x).clamp(0, 1)

    def _near_copy(self, x: torch.Tensor, row: int) -> torch.Tensor:
        """(3, 32, 32) shifted by this row's (dy, dx) pixels, zero fill, and noised."""
        dy, dx = (int(v) for v in self.shift[row])
        out = torch.zeros_like(x)
        out[:, max(dy, 0):SIDE + min(dy, 0), max(dx, 0):SIDE + min(dx, 0)] = \
            x[:, max(-dy, 0):SIDE + min(-dy, 0), max(-dx, 0):SIDE + min(-dx, 0)]
        noise = np.random.default_rng([self.seed, self.n, row]).normal(0, self.noise, x.shape)
        return (out + torch.as_tensor(noise, dtype=torch.float32)).clamp(0, 1)

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.n)
        x = self._pictures(self.source[a:b])
        for r in np.flatnonzero(self.near[a:b]):
            x[r] = self._near_copy(x[r], a + r)
        return (x * 255).round().to(torch.uint8).numpy()

    def planted(self) -> np.ndarray:
        """(P, 2) (source, copy) rows of every planted copy."""
        copies = np.arange(self.originals, self.n)
        return np.stack([self.source[copies], copies], axis=1)


def _cpu_seconds() -> float:
    """User and system CPU time of this process so far, s."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(args: argparse.Namespace) -> dict:
    """One search in this process: {search_s (wall), search_cpu_s, peak_rss_gb, recall, groups,
    group_sets}; generating the images is part of the search's time (as reading them would be)."""
    import faiss

    from raycurv.duplicates import find_duplicates

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    images = SyntheticImages(args.worker, near=args.near, exact=args.exact, noise=args.noise)
    labels = np.zeros(len(images), dtype=np.int64)
    start, cpu = time.perf_counter(), _cpu_seconds()
    dups = find_duplicates(images, labels, scale=255.0,
                           exact_below=len(images) + 1 if args.flat else 0)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    planted = images.planted()
    group = dups.group[planted]
    return {"search_s": round(seconds, 1), "search_cpu_s": round(cpu, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2),
            "recall": round(float(np.mean((group[:, 0] >= 0) & (group[:, 0] == group[:, 1]))), 4),
            "groups": len(dups.groups),
            "group_sets": [g.members.tolist() for g in dups.groups]}


def run(n: int, args: argparse.Namespace, *, flat: bool) -> dict:
    """``measure`` in a fresh process."""
    cmd = [sys.executable, "-m", "bench.neardup", "--worker", str(n), "--threads", str(args.threads),
           "--near", str(args.near), "--exact", str(args.exact), "--noise", str(args.noise)]
    done = subprocess.run(cmd + (["--flat"] if flat else []), check=True, capture_output=True,
                          text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _line(n: int, kind: str, found: dict) -> str:
    return (f"N={n}: {kind} search {found['search_s']} s ({found['search_cpu_s']} s CPU), "
            f"peak RSS {found['peak_rss_gb']} GB, recall {found['recall']}, "
            f"{found['groups']} groups")


def compare(exact: dict, approx: dict) -> dict:
    """The flat path's figures beside the IVF path's at one N: speed ratios (wall, CPU) and the
    share of the flat path's groups the IVF path finds identically."""
    same = {tuple(g) for g in exact["group_sets"]} & {tuple(g) for g in approx["group_sets"]}
    return {"exact_search_s": exact["search_s"], "exact_search_cpu_s": exact["search_cpu_s"],
            "exact_peak_rss_gb": exact["peak_rss_gb"], "exact_recall": exact["recall"],
            "approx_vs_exact_speedup": round(exact["search_s"] / approx["search_s"], 2),
            "approx_vs_exact_cpu_speedup": round(exact["search_cpu_s"] / approx["search_cpu_s"], 2),
            "agreement": round(len(same) / max(1, len(exact["group_sets"])), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50000,500000", help="comma-separated N")
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    parser.add_argument("--near", type=float, default=0.01, help="share of near copies")
    parser.add_argument("--exact", type=float, default=0.002, help="share of exact copies")
    parser.add_argument("--noise", type=float, default=0.03,
                        help="std of the near copies' noise, share of the intensity range")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--flat", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    per_n = ("search_s", "search_cpu_s", "peak_rss_gb", "recall", "groups")
    figures = {key: {} for key in per_n}
    for n in sizes:
        found = run(n, args, flat=False)
        print(_line(n, "IVF", found), flush=True)
        for key in per_n:
            figures[key][n] = found[key]
        if n == sizes[0]:
            exact = run(n, args, flat=True)
            figures |= compare(exact, found)
            print(_line(n, "flat", exact) + f"; IVF {figures['approx_vs_exact_speedup']}x faster "
                  f"({figures['approx_vs_exact_cpu_speedup']}x in CPU time), agreement "
                  f"{figures['agreement']}", flush=True)
    print(json.dumps(figures | {"threads": args.threads, "near": args.near, "exact": args.exact,
                                "noise": args.noise}))


if __name__ == "__main__":
    main()
