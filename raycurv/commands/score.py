"""`raycurv score`: train on Ray, score every sample's curvature, write the run folder."""

from __future__ import annotations

import argparse
import json

from raycurv.commands._common import add_address, add_spec_flags, spec_overrides
from raycurv.config import ScoreSpec, load_yaml, merge
from raycurv.runfolder import RunFolder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with a run spec; flags override it")
    add_spec_flags(parser)
    add_address(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's and Ray Train's own INFO lines (checkpoints, reports)")


def build_spec(args: argparse.Namespace) -> ScoreSpec:
    base = load_yaml(args.config) if args.config else {}
    return ScoreSpec.model_validate(merge(base, spec_overrides(args)))


def run(args: argparse.Namespace) -> int:
    from raycurv.evaluate import format_metrics
    from raycurv.run import score_run

    spec = build_spec(args)
    result = score_run(spec, address=args.address, verbose=args.verbose)
    if args.json:
        print(json.dumps({"run_dir": result.run_dir, "seconds": result.seconds,
                          "train": result.train, "metrics": result.metrics}, default=str))
        return 0
    table = result.table
    print(f"wrote {RunFolder(result.run_dir).scores}: {table.num_rows} samples, "
          f"{spec.train.epochs} epochs, {result.seconds:.0f} s")
    if "train_acc" in result.train:
        print(f"train accuracy {result.train['train_acc']:.4f}, train loss {result.train['train_loss']:.4f}")
    print("most memorized (rank, sample_id, label, original_label, curvature):")
    top = table.sort_by([("rank", "ascending")]).slice(0, 10).to_pylist()
    for row in top:
        print(f"  {row['rank']:>4}  {row['sample_id']:>7}  {row['label']:>4}  "
              f"{row['original_label']:>4}  {row['curvature']:.6g}")
    print(format_metrics(result.metrics))
    return 0
