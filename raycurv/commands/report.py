"""`raycurv report RUN`: PNG figures and an offline HTML gallery of the most memorized samples."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (or its scores.parquet)")
    parser.add_argument("--out", help="report folder to write (default: RUN/report)")
    parser.add_argument("--top", type=int, default=100, help="samples in the gallery (default 100)")
    parser.add_argument("--reference", metavar="FILE",
                        help="a reference table from `raycurv reference`: add agreement and a scatter")
    parser.add_argument("--epochs", metavar="A:B",
                        help="score by the mean curvature of epochs A..B-1")
    parser.add_argument("--duplicates", action=argparse.BooleanOptionalAction, default=True,
                        help="find exact and near duplicate images (default on)")
    parser.add_argument("--near-threshold", type=float, metavar="D",
                        help="aligned distance for near duplicates (default 0.15)")


def run(args: argparse.Namespace) -> int:
    from raycurv.errors import UsageError
    from raycurv.report import make_report

    if args.near_threshold is not None and not 0 <= args.near_threshold <= 2:
        raise UsageError(f"--near-threshold must lie in [0, 2], got {args.near_threshold:g}")
    out = make_report(args.run, args.out, top=args.top, reference=args.reference,
                      epochs=args.epochs, duplicates=args.duplicates, threshold=args.near_threshold)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}/index.html: {len(files)} files; open it in a browser (works offline)")
    return 0
