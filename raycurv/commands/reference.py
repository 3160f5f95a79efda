"""`raycurv reference`: the Feldman-Zhang subsampling memorization estimate, trained on Ray."""

from __future__ import annotations

import argparse
import json
from typing import Any

from raycurv.commands._common import (
    SPEC_FLAGS,
    add_address,
    add_spec_flags,
    finite_float,
    spec_overrides,
)
from raycurv.config import merge
from raycurv.errors import UsageError
from raycurv.runfolder import REFERENCE_FILE, RUN_FILE, RunFolder

# The dataset and training flags of `raycurv score` that mean the same here.
SHARED_FLAGS = ("--dataset", "--data-root", "--download", "--limit", "--noise", "--noise-kind",
                "--duplicates", "--image-column", "--label-column", "--seed", "--epochs",
                "--batch-size", "--lr", "--momentum", "--weight-decay", "--schedule")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-run", metavar="RUN",
                        help="take the dataset, noise and seed from this run's spec, so the "
                             "reference is computed on exactly the labels the run trained on")
    parser.add_argument("--out", help=f"reference table to write (default: RUN/{REFERENCE_FILE} "
                                      f"with --from-run, else runs/reference/{REFERENCE_FILE})")
    parser.add_argument("--models", type=int, help="M, models trained (default 1000)")
    parser.add_argument("--keep", type=finite_float, help="share of the data each model trains on (default 0.7)")
    parser.add_argument("--model", dest="ref_model", choices=("mlp", "cnn"),
                        help="mlp (default; one hidden layer) or cnn (two grouped conv layers)")
    parser.add_argument("--width", type=int, help="hidden units of the mlp (default 256); the "
                                                  "cnn uses width/8 and width/4 channels")
    parser.add_argument("--models-per-task", type=int, help="models trained together per Ray task (default 100)")
    parser.add_argument("--task-cpus", type=finite_float, help="CPUs per Ray task (default 1)")
    parser.add_argument("--task-gpus", type=finite_float, help="GPUs per Ray task (default 0)")
    add_spec_flags(parser, skip=tuple(f for f in SPEC_FLAGS if f not in SHARED_FLAGS))
    add_address(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _from_run(run: str) -> dict[str, Any]:
    record = RunFolder(run).read_record()
    if record is None:
        raise UsageError(f"no {RUN_FILE} in {run}; is it a run folder?")
    spec = record["spec"]
    return {"data": spec["data"], "seed": spec.get("seed", 0)}


def build_spec(args: argparse.Namespace):
    from raycurv.reference import ReferenceSpec

    base = _from_run(args.from_run) if args.from_run else {}
    overrides = spec_overrides(args)
    train = overrides.setdefault("train", {})
    for key, value in (("model", args.ref_model), ("width", args.width)):
        if value is not None:
            train[key] = value
    for key in ("models", "keep", "models_per_task", "task_cpus", "task_gpus"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.out:
        overrides["out"] = args.out
    elif args.from_run:
        overrides["out"] = RunFolder(args.from_run).reference
    return ReferenceSpec.model_validate(merge(base, overrides))


def run(args: argparse.Namespace) -> int:
    from raycurv.reference import estimate

    spec = build_spec(args)
    result = estimate(spec, address=args.address,
                      progress=(lambda *_: None) if args.json else None)
    s = result.summary
    if args.json:
        print(json.dumps({"out": result.path, **s}))
        return 0
    print(f"wrote {result.path}: {s['models']} {spec.train.model} models on "
          f"{result.table.num_rows} samples ({s['subset_size']} each), {result.seconds:.0f} s")
    print(f"mean accuracy on trained-on samples {s['mean_acc_in']:.4f}, held out {s['mean_acc_out']:.4f}")
    df = result.table.to_pandas().sort_values("mem", ascending=False, kind="stable").head(10)
    print("most memorized (sample_id, label, mem, p_in, p_out):")
    for row in df.itertuples():
        print(f"  {row.sample_id:>7}  {row.label:>4}  {row.mem:+.3f}  {row.p_in:.3f}  {row.p_out:.3f}")
    return 0
