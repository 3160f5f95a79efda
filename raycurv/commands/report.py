"""`raycurv report RUN`: PNG figures and an offline HTML gallery of the most memorized samples."""

from __future__ import annotations

import argparse

from raycurv.commands._common import add_window_and_duplicate_flags, check_near_threshold


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (or its score table), a path or a URI")
    parser.add_argument("--out", help="report folder to write (default: RUN/report)")
    parser.add_argument("--top", type=int, default=100, help="samples in the gallery (default 100)")
    parser.add_argument("--reference", metavar="FILE",
                        help="a reference table from `raycurv reference`: add agreement and a scatter")
    add_window_and_duplicate_flags(parser)


def run(args: argparse.Namespace) -> int:
    from raycurv.report import make_report

    check_near_threshold(args.near_threshold)
    out, files = make_report(args.run, args.out, top=args.top, reference=args.reference,
                             epochs=args.epochs, duplicates=args.duplicates,
                             threshold=args.near_threshold)
    print(f"wrote {out}/index.html: {files} files; open it in a browser (works offline)")
    return 0
