"""`raycurv evaluate RUN`: detection metrics of a stored score table, agreement with a
Feldman-Zhang reference (--reference), duplicate groups in the images, an epoch window (--epochs)."""

from __future__ import annotations

import argparse
import json

from raycurv.commands._common import (
    add_window_and_duplicate_flags,
    check_near_threshold,
    finite_float,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (or its score table), a path or a URI")
    parser.add_argument("--reference", metavar="FILE",
                        help="a reference table from `raycurv reference`: report agreement with it")
    parser.add_argument("--top-k", type=finite_float, default=0.1, metavar="K",
                        help="agreement on the reference's top K samples: a share if < 1 (default 0.1), else a count")
    add_window_and_duplicate_flags(parser)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from raycurv.evaluate import evaluate_run, format_run

    check_near_threshold(args.near_threshold)
    metrics = evaluate_run(args.run, reference=args.reference, top_k=args.top_k, epochs=args.epochs,
                           duplicates=args.duplicates, threshold=args.near_threshold)
    print(json.dumps(metrics) if args.json else format_run(metrics))
    return 0
