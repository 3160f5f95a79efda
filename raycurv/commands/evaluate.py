"""`raycurv evaluate RUN`: detection metrics of a stored score table."""

from __future__ import annotations

import argparse
import json

from raycurv.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (or its scores.parquet)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from raycurv.evaluate import evaluate_table, format_metrics
    from raycurv.table import TableError, read_scores

    try:
        table = read_scores(args.run)
    except TableError as exc:
        raise UsageError(str(exc)) from None
    metrics = evaluate_table(table)
    print(json.dumps(metrics) if args.json else format_metrics(metrics))
    return 0
