"""Where curvature finds mislabels best: one training regime after another, on the same data.

Each regime trains raycurv's model in-process and scores every sample after every epoch
(bench.quality.train_and_score, n probes), then reports curvature's mislabel AUROC (and
duplicate AUROC with --duplicates) over every epoch, over the last third of the epochs, for each
single epoch and as a running mean, against every other score of raycurv's table (csl, final
loss, the training-dynamics co-scores), with how far training went: the last epoch's accuracy
on the labels trained on, and the share of corrupted labels the training pass fit (memorized).

Regimes (changes from raycurv's defaults: small CNN of width 32, 12 epochs, SGD lr 0.01,
momentum 0.9, weight decay 5e-4, cosine schedule, h = 0.03):

    default    raycurv's defaults
    narrow     width 8                      wide       width 64
    long       3x the epochs                short      half the epochs
    memorize   weight decay 0, constant lr, 3x the epochs (fits the noisy labels)
    regularize weight decay 5e-3 (does not)
    lr-high    lr 0.05                      step       step schedule     constant   constant lr
    h-small    h = 0.01                     h-large    h = 0.1
    resnet18   resnet18_cifar (3x3 stem, no max-pool)
    fit        width 64, lr 0.05, 2x the epochs (sure of more clean samples sooner)

    python -m bench.regimes --dataset digits --seeds 0,1 --regimes default,narrow,wide,long,memorize,regularize
    python -m bench.regimes --dataset fashion-mnist --limit 10000 --epochs 15 --regimes default,memorize

Output ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench.quality import (
    add_data_arguments,
    analyze,
    auroc,
    data_spec,
    targets,
    train_and_score,
    with_terms,
)
from raycurv.config import CurvatureSpec, DataSpec, ScoreSpec, TrainSpec

REGIMES: dict[str, dict] = {
    "default": {},
    "narrow": {"width": 8},
    "wide": {"width": 64},
    "long": {"epochs_factor": 3.0},
    "short": {"epochs_factor": 0.5},
    "memorize": {"weight_decay": 0.0, "schedule": "constant", "epochs_factor": 3.0},
    "regularize": {"weight_decay": 5e-3},
    "lr-high": {"lr": 0.05},
    "step": {"schedule": "step"},
    "constant": {"schedule": "constant"},
    "h-small": {"h": 0.01},
    "h-large": {"h": 0.1},
    "resnet18": {"model": "resnet18_cifar"},
    "fit": {"width": 64, "lr": 0.05, "epochs_factor": 2.0},
}


def regime_spec(name: str, *, base_epochs: int, data: DataSpec, seed: int,
                probes: int) -> tuple[ScoreSpec, int | None]:
    """The run spec of regime ``name`` (REGIMES) and its small-CNN width (None: the model's own)."""
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}; known: {', '.join(REGIMES)}")
    r = REGIMES[name]
    epochs = max(1, round(base_epochs * r.get("epochs_factor", 1.0)))
    train = TrainSpec(epochs=epochs, **{k: r[k] for k in ("lr", "weight_decay", "schedule", "model")
                                        if k in r})
    curv = CurvatureSpec(probes=probes, **({"h": r["h"]} if "h" in r else {}))
    return ScoreSpec(seed=seed, data=data, train=train, curvature=curv), r.get("width")


def measure(name: str, args: argparse.Namespace) -> dict:
    """Train and score regime ``name`` on every seed; its figures (bench.quality.analyze) and
    seconds."""
    data = data_spec(args)
    runs, seconds = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        spec, width = regime_spec(name, base_epochs=args.epochs, data=data, seed=seed,
                                  probes=args.probes)
        tic = time.perf_counter()
        runs.append(with_terms(train_and_score(spec, probes=args.probes, width=width)))
        seconds.append(time.perf_counter() - tic)
    result = analyze(runs)
    epochs = result["epochs"]
    last = max(1, epochs // 3)
    out = {"regime": name, "epochs": epochs, "seconds": statistics.mean(seconds),
           "train_seconds": statistics.mean(float(r["seconds"][0]) for r in runs),
           "score_seconds": statistics.mean(float(r["seconds"][1]) for r in runs),
           **result["training"], "targets": {}}
    for target, by_epoch in result["by_epoch"].items():
        out["targets"][target] = {
            "curvature": statistics.mean(result["reference"][target]),
            "curvature_worst": min(result["reference"][target]),
            f"curvature_last_{last}": statistics.mean(
                auroc(run["terms"][-last:].mean(axis=(0, 1))[among], positives[among])
                for run in runs for positives, among in [targets(run)[target]]),
            "best_epoch": max(range(epochs), key=lambda e: by_epoch["single"][e]),
            "single": by_epoch["single"], "running_mean": by_epoch["running_mean"],
            **result["baselines"][target]}
    return out


def print_row(m: dict) -> None:
    for target, t in m["targets"].items():
        last = next(k for k in t if k.startswith("curvature_last_"))
        others = ", ".join(f"{k} {v:.4f}" for k, v in t.items()
                           if k not in ("curvature", "curvature_worst", last, "best_epoch",
                                        "single", "running_mean"))
        print(f"| {m['regime']} | {target} | {m['epochs']} | {m['train_acc']:.3f} | "
              f"{m['noisy_fit']:.3f} | {t['curvature']:.4f} ({t['curvature_worst']:.4f}) | "
              f"{t[last]:.4f} ({last.removeprefix('curvature_')}) | "
              f"{max(t['single']):.4f} (epoch {t['best_epoch']}) | {others} | {m['seconds']:.0f} |")
        print(f"|   running mean by epoch: {' '.join(f'{v:.3f}' for v in t['running_mean'])}; "
              f"single epochs: {' '.join(f'{v:.3f}' for v in t['single'])} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=TrainSpec().epochs, help="the base epochs")
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--regimes", default="default,memorize,regularize")
    args = parser.parse_args()
    names = args.regimes.split(",")
    unknown = [n for n in names if n not in REGIMES]
    if unknown:
        parser.error(f"unknown regime(s) {', '.join(unknown)}; known: {', '.join(REGIMES)}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print("| regime | target | epochs | train acc | noisy fit | curvature AUROC (worst seed) | "
          "last third | best single epoch | other scores | s/seed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in names:
        print(f"regime {name} ...", file=sys.stderr, flush=True)
        results.append(measure(name, args))
        print_row(results[-1])
    print(json.dumps({"bench": "regimes", "dataset": args.dataset, "limit": args.limit,
                      "noise": args.noise, "duplicates": args.duplicates, "seeds": args.seeds,
                      "base_epochs": args.epochs, "probes": args.probes,
                      "wall_seconds": time.perf_counter() - started, "regimes": results}))


if __name__ == "__main__":
    main()
