"""`raycurv sweep`: Ray Tune over noise rates x h (x probes, variants, seeds, training settings)."""

from __future__ import annotations

import argparse
from typing import Any

from raycurv.commands._common import add_address, finite_float
from raycurv.config import load_yaml, merge
from raycurv.detection import METRICS


def _floats(text: str) -> list[float]:
    return [finite_float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _words(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# flag -> (axis, parser): comma-separated values of one axis
AXIS_FLAGS = {"--noise": ("noise", _floats), "--h": ("h", _floats), "--probes": ("probes", _ints),
              "--variant": ("variant", _words), "--seeds": ("seed", _ints), "--lr": ("lr", _floats),
              "--noise-kind": ("noise_kind", _words)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="sweep YAML: base (a run spec), grid (axis -> values), "
                                         "search, num_samples, metric, max_concurrent")
    parser.add_argument("--sweep-dir", required=True, help="where trials and results go")
    for flag, (axis, kind) in AXIS_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=f"comma-separated {axis} values")
    parser.add_argument("--dataset", default=None, help="base dataset (default digits)")
    parser.add_argument("--limit", type=int, default=None, help="base: seeded subset size")
    parser.add_argument("--epochs", type=int, default=None, help="base: training epochs")
    parser.add_argument("--search", choices=["grid", "random"], default=None)
    parser.add_argument("--num-samples", type=int, default=None, help="random search: trials")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="of curvature for the corrupted labels: what a trial reports and best.json picks by")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at a time")
    add_address(parser)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"grid": {}, "base": {}}
    for flag, (axis, _) in AXIS_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            out["grid"][axis] = value
    base = {"data": {k: v for k, v in (("dataset", args.dataset), ("limit", args.limit)) if v is not None},
            "train": {"epochs": args.epochs} if args.epochs is not None else {}}
    out["base"] = {k: v for k, v in base.items() if v}
    for key in ("search", "num_samples", "metric", "max_concurrent"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


def run(args: argparse.Namespace) -> int:
    from raycurv.sweep import best_row, load_sweep, run_sweep

    data = merge(load_yaml(args.config) if args.config else {"grid": {}}, _overrides(args))
    sweep = load_sweep(data, args.sweep_dir)
    rows = run_sweep(sweep, args.sweep_dir, address=args.address)
    print(f"wrote {args.sweep_dir}/sweep.parquet ({len(rows)} rows), sweep.csv, best.json, auroc_vs_noise.png")
    print(f"{'estimator':<22}{'noise':>7}{'AUROC':>8}{'AP':>8}{'csl AUROC':>11}{'wall s':>8}")
    for r in sorted(rows, key=lambda r: (r["noise"], r["estimator"])):
        print(f"{r['estimator']:<22}{r['noise']:>7g}{r['curvature_auroc']:>8.4f}{r['curvature_average_precision']:>8.4f}"
              f"{r['csl_auroc']:>11.4f}{r['wall_s']:>8.0f}")
    best = best_row(rows, sweep.metric)
    if best:
        print(f"best by curvature {sweep.metric}: {best['estimator']} at noise {best['noise']:g} "
              f"({best[f'curvature_{sweep.metric}']:.4f})")
    return 0
