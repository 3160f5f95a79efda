"""`raycurv query`: one sample or the top k of a run, from the service or straight from a table."""

from __future__ import annotations

import argparse
import json

from raycurv.errors import UsageError
from raycurv.serve.client import DEFAULT_URL
from raycurv.serve.settings import TOKEN_ENV, env_token


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `raycurv query`."""
    parser.add_argument("run", metavar="RUN",
                        help="a run served at --url, or a run folder (or its score table; a path "
                             "or a URI) to read directly (used when it exists and --url is not given)")
    parser.add_argument("sample_id", metavar="SAMPLE_ID", type=int, nargs="?",
                        help="the sample to show")
    parser.add_argument("--top", type=int, metavar="K",
                        help="the K most memorized samples (highest curvature, rank 1 first)")
    parser.add_argument("--label", type=int, help="with --top: only samples of this label")
    parser.add_argument("--order", choices=("desc", "asc"), default="desc",
                        help="with --top: desc = most memorized first (default), asc = least")
    parser.add_argument("--url", default=None, help=f"the service ({DEFAULT_URL})")
    parser.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")


def _check(args: argparse.Namespace) -> None:
    if (args.sample_id is None) == (args.top is None):
        raise UsageError("give either SAMPLE_ID or --top K")
    if args.sample_id is not None and args.sample_id < 0:
        raise UsageError(f"SAMPLE_ID must be >= 0, got {args.sample_id}")
    if args.top is not None and args.top < 1:
        raise UsageError(f"--top must be >= 1, got {args.top}")
    if args.label is not None and (args.top is None or args.label < 0):
        raise UsageError("--label needs --top and a label >= 0")


def run(args: argparse.Namespace) -> int:
    """Ask the service (or read the table) and print the rows."""
    from raycurv.api import lookup, reads_table
    from raycurv.serve.client import format_rows

    _check(args)
    local = reads_table(args.run, url=args.url)
    url = args.url or DEFAULT_URL
    body = lookup(args.run, args.sample_id, top=args.top, label=args.label, order=args.order,
                  url=args.url, token=args.token or env_token())
    rows = [body["sample"]] if args.sample_id is not None else body["rows"]
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        source = args.run if local else f"{url} run {args.run}"
        what = (f"sample {args.sample_id}" if args.sample_id is not None else
                f"top {args.top} ({'most' if args.order == 'desc' else 'least'} memorized"
                f"{'' if args.label is None else f', label {args.label}'}; "
                f"{body['total']} matching)")
        print(f"{source}: {what}")
        print(format_rows(rows))
    return 0
