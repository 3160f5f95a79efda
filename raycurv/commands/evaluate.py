"""`raycurv evaluate RUN`: detection metrics of a stored score table, agreement with a
Feldman-Zhang reference (--reference), duplicate groups in the images, an epoch window (--epochs)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (or its scores.parquet)")
    parser.add_argument("--reference", metavar="FILE",
                        help="a reference table from `raycurv reference`: report agreement with it")
    parser.add_argument("--top-k", type=float, default=0.1, metavar="K",
                        help="agreement on the reference's top K samples: a share if < 1 (default 0.1), else a count")
    parser.add_argument("--epochs", metavar="A:B",
                        help="score by the mean curvature of epochs A..B-1 (from curvature_by_epoch.parquet)")
    parser.add_argument("--duplicates", action=argparse.BooleanOptionalAction, default=True,
                        help="find exact and near duplicate images (default on; needs the run's data)")
    parser.add_argument("--near-threshold", type=float, metavar="D",
                        help="aligned distance for near duplicates (default 0.15; see raycurv.duplicates)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from raycurv.errors import UsageError
    from raycurv.evaluate import evaluate_run, format_run

    if args.near_threshold is not None and not 0 <= args.near_threshold <= 2:
        raise UsageError(f"--near-threshold must lie in [0, 2], got {args.near_threshold:g}")
    metrics = evaluate_run(args.run, reference=args.reference, top_k=args.top_k, epochs=args.epochs,
                           duplicates=args.duplicates, threshold=args.near_threshold)
    print(json.dumps(metrics) if args.json else format_run(metrics))
    return 0
