"""`raycurv export RUN --format csv|jsonl|cleanlab|fiftyone`: a run's scores for other tools."""

from __future__ import annotations

import argparse

from raycurv.commands._common import finite_float

FORMAT_CHOICES = ("csv", "jsonl", "cleanlab", "fiftyone")  # raycurv.export.FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (or its score table), a path or a URI")
    parser.add_argument("--format", required=True, choices=FORMAT_CHOICES,
                        help="csv, jsonl (every score, path, class names), cleanlab (its "
                             "label-issues table) or fiftyone (an image-classification dataset folder)")
    parser.add_argument("--output", "-o", metavar="PATH",
                        help="file (folder for fiftyone), a path or a URI (default: RUN/exports/...)")
    parser.add_argument("--threshold", type=finite_float, default=None, metavar="P",
                        help="percentile of the mislabel score (csl) from which a sample predicted "
                             "as another class is a label issue (default 0.9)")


def run(args: argparse.Namespace) -> int:
    from raycurv.api import export
    from raycurv.suspected import DEFAULT_THRESHOLD

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    written = export(args.run, format=args.format, output=args.output, threshold=threshold)
    print(f"wrote {written} ({args.format})")
    return 0
