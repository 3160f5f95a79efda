"""Flag helpers shared by the verbs."""

from __future__ import annotations

import argparse
import math
from typing import Any

from raycurv.errors import UsageError


def finite_float(text: str) -> float:
    """argparse type of every real-valued flag: a number, and finite (inf and nan are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value

# flag -> (spec section or None for the top level, field, argparse kwargs)
SPEC_FLAGS: dict[str, tuple[str | None, str, dict[str, Any]]] = {
    "--dataset": ("data", "dataset", {"help": "digits (default), fashion-mnist, mnist, cifar10, "
                                              "cifar100, imagefolder, parquet"}),
    "--data-root": ("data", "data_root", {"help": "folder (or Parquet file) holding the data"}),
    "--download": ("data", "download", {"action": "store_const", "const": True,
                                        "help": "download CIFAR when missing (never by default)"}),
    "--limit": ("data", "limit", {"type": int, "help": "keep a seeded subset of N samples"}),
    "--noise": ("data", "noise", {"type": finite_float, "help": "label-noise rate in [0, 1)"}),
    "--noise-kind": ("data", "noise_kind", {"help": "symmetric (default) or pairwise"}),
    "--duplicates": ("data", "duplicates", {"type": int,
                                            "help": "append M copies of images with a conflicting label"}),
    "--augment": ("data", "augment", {"action": argparse.BooleanOptionalAction,
                                      "help": "random crop + flip in training (default: per dataset)"}),
    "--image-column": ("data", "image_column", {"help": "parquet source: image column"}),
    "--label-column": ("data", "label_column", {"help": "parquet source: label column"}),
    "--path-column": ("data", "path_column", {"help": "parquet source: a column naming each "
                                                      "sample's file (default: file#row)"}),
    "--image-size": ("data", "image_size", {"help": "imagefolder/parquet: resize every image to "
                                                    "H or HxW pixels"}),
    "--max-classes": ("data", "max_classes", {"type": int, "help": "refuse labels that make more "
                                                                   "classes (default 100000)"}),
    "--duplicate-search": ("data", "duplicate_search", {
        "action": argparse.BooleanOptionalAction,
        "help": "search the images for duplicates whose labels disagree at the end of the run, "
                "for the suspected column (default on)"}),
    "--seed": (None, "seed", {"type": int}),
    "--name": (None, "name", {"help": "run name (default: the run folder's name)"}),
    "--run-dir": (None, "run_dir", {"help": "run folder: a path or a pyarrow URI (s3://, gs://)"}),
    "--model": ("train", "model", {"help": "small_cnn (default), resnet18_cifar, resnet18, resnet50, "
                                           "or package.module:factory, a callable "
                                           "(in_channels, num_classes) -> nn.Module"}),
    "--weights": ("train", "weights", {"help": "a state dict file to start training from "
                                               "(read with weights_only; never downloaded)"}),
    "--epochs": ("train", "epochs", {"type": int}),
    "--batch-size": ("train", "batch_size", {"type": int, "help": "training batch per worker"}),
    "--lr": ("train", "lr", {"type": finite_float}),
    "--momentum": ("train", "momentum", {"type": finite_float}),
    "--weight-decay": ("train", "weight_decay", {"type": finite_float}),
    "--schedule": ("train", "schedule", {"help": "cosine (default), step or constant"}),
    "--workers": ("train", "workers", {"type": int, "help": "data-parallel training workers"}),
    "--gpus-per-worker": ("train", "gpus_per_worker", {"type": finite_float}),
    "--cpus-per-worker": ("train", "cpus_per_worker", {"type": finite_float}),
    "--max-failures": ("train", "max_failures", {"type": int,
                                                 "help": "worker failures to recover from"}),
    "--h": ("curvature", "h", {"type": finite_float, "help": "perturbation size (default 0.03)"}),
    "--probes": ("curvature", "probes", {"type": int, "help": "Rademacher probes n (default 2)"}),
    "--variant": ("curvature", "variant", {"help": "norm (default) or trace"}),
    "--score-every": ("curvature", "every", {"type": int, "help": "score every k-th epoch, "
                                                                   "counted back from the last (default 1)"}),
    "--score-from": ("curvature", "from_epoch", {"type": int,
                                                 "help": "first epoch scored, 0-based (default 0)"}),
    "--method": ("curvature", "method", {"help": "fd (finite differences, default) or hvp "
                                                 "(exact Hessian-vector products)"}),
    "--precision": ("curvature", "precision", {"help": "fp32 (default); bf16 or fp16 mixed "
                                                       "precision with --method hvp"}),
    "--optimize": ("curvature", "optimize", {"action": argparse.BooleanOptionalAction,
                                             "help": "fold batch norm, channels last (default on)"}),
    "--compile": ("curvature", "compile", {"action": argparse.BooleanOptionalAction,
                                           "help": "torch.compile the scoring model (default off)"}),
    "--score-batch-size": ("curvature", "batch_size", {"type": int}),
    "--actors": ("curvature", "actors", {"type": int, "help": "curvature actors (shards)"}),
    "--actor-cpus": ("curvature", "actor_cpus", {"type": finite_float}),
    "--actor-gpus": ("curvature", "actor_gpus", {"type": finite_float}),
    "--max-lag": ("curvature", "max_lag", {"type": int,
                                           "help": "epochs in flight before training waits"}),
}


def add_spec_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    for flag, (_, field, kwargs) in SPEC_FLAGS.items():
        if flag not in skip:
            metavar = {} if kwargs.get("action") else {"metavar": flag.lstrip("-").replace("-", "_").upper()}
            parser.add_argument(flag, dest=f"spec__{field}__{flag}", default=None, **metavar, **kwargs)


def spec_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields the user set on the command line, as a nested dict."""
    out: dict[str, Any] = {}
    for flag, (section, field, _) in SPEC_FLAGS.items():
        value = getattr(args, f"spec__{field}__{flag}", None)
        if value is None:
            continue
        (out.setdefault(section, {}) if section else out)[field] = value
    return out


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster (default: start a local one)")


def add_window_and_duplicate_flags(parser: argparse.ArgumentParser) -> None:
    """--epochs, --duplicates and --near-threshold, shared by `evaluate` and `report`."""
    parser.add_argument("--epochs", metavar="A:B",
                        help="score by the mean curvature of epochs A..B-1 (from the per-epoch table)")
    parser.add_argument("--duplicates", action=argparse.BooleanOptionalAction, default=True,
                        help="find exact and near duplicate images (default on; needs the run's data)")
    parser.add_argument("--near-threshold", type=finite_float, metavar="D",
                        help="aligned distance for near duplicates (default 0.15; see raycurv.duplicates)")


def check_near_threshold(value: float | None) -> None:
    if value is not None and not 0 <= value <= 2:
        raise UsageError(f"--near-threshold must lie in [0, 2], got {value:g}")
