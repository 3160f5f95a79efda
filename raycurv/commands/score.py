"""`raycurv score`: train on Ray, score every sample's curvature, write the run folder. With
``--checkpoints``: score saved weights, one file per epoch, without training (raycurv.checkpoints)."""

from __future__ import annotations

import argparse
import json

from raycurv.commands._common import add_address, add_spec_flags, spec_overrides
from raycurv.config import ScoreSpec, load_yaml, merge
from raycurv.errors import UsageError
from raycurv.runfolder import RunFolder

NO_RECORDS = ("csl and the co-scores are absent: not every checkpoint carries training records "
              "(csl is written as 0 and the co-scores as null; the table's metadata says "
              '"training_records": false). Record them with raycurv.Recorder for exact ones.')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with a run spec; flags override it")
    add_spec_flags(parser)
    parser.add_argument("--checkpoints", metavar="DIR_OR_GLOB",
                        help="score these saved weights instead of training: the .pt/.pth files "
                             "of a folder or glob, one per epoch in file-name order (state "
                             "dicts, or epoch files with training records from --keep-weights "
                             "or raycurv.Recorder); --model must match them")
    parser.add_argument("--keep-weights", action="store_const", const=True, default=None,
                        help="keep each epoch's weights as <run>/epochs/epoch-EEEE.pt "
                             "(to score again with --checkpoints)")
    add_address(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's and Ray Train's own INFO lines (checkpoints, reports)")


def build_spec(args: argparse.Namespace) -> ScoreSpec:
    base = load_yaml(args.config) if args.config else {}
    overrides = spec_overrides(args)
    train = overrides.setdefault("train", {})
    if args.checkpoints is not None:
        if "epochs" in train:
            raise UsageError("--epochs does not apply with --checkpoints: one epoch per checkpoint file")
        train["checkpoints"] = args.checkpoints
    if args.keep_weights:
        train["keep_weights"] = True
    return ScoreSpec.model_validate(merge(base, overrides))


def run(args: argparse.Namespace) -> int:
    from raycurv.evaluate import format_metrics
    from raycurv.run import score_run

    spec = build_spec(args)
    result = score_run(spec, address=args.address, verbose=args.verbose)
    if args.json:
        print(json.dumps({"run_dir": result.run_dir, "seconds": result.seconds, "epochs": result.epochs,
                          "training_records": result.training_records,
                          "train": result.train, "metrics": result.metrics}, default=str))
        return 0
    table = result.table
    what = "checkpoints" if spec.train.checkpoints else "epochs"
    print(f"wrote {RunFolder(result.run_dir).scores}: {table.num_rows} samples, "
          f"{result.epochs} {what}, {result.seconds:.0f} s")
    if not result.training_records:
        print(NO_RECORDS)
    if "train_acc" in result.train:
        print(f"train accuracy {result.train['train_acc']:.4f}, train loss {result.train['train_loss']:.4f}")
    print("most memorized (rank, sample_id, label, original_label, curvature):")
    top = table.sort_by([("rank", "ascending")]).slice(0, 10).to_pylist()
    for row in top:
        print(f"  {row['rank']:>4}  {row['sample_id']:>7}  {row['label']:>4}  "
              f"{row['original_label']:>4}  {row['curvature']:.6g}")
    print(format_metrics(result.metrics))
    return 0
