"""raycurv's scores against a peer, cleanlab, on the same data, noise, seeds and model.

raycurv: one training as a scoring run does it (bench.quality.train_and_score: raycurv's model,
optimizer, schedule and training step), with curvature scored after every epoch; its table's
scores are curvature, csl, final loss and the training-dynamics co-scores (aum, margin,
forgetting events, learned epoch), each read in raycurv.detection's direction.

cleanlab: out-of-sample predicted probabilities from K-fold cross-validation (stratified, K = 3 by
default) of the same model, trained the same way for the same epochs on each fold's other
samples; then cleanlab's label-quality score (``cleanlab.rank.get_label_quality_scores``,
self-confidence; lower = more likely a label issue, negated here) and its flagged set
(``cleanlab.filter.find_label_issues``, prune by noise rate).

Figures (raycurv.detection's targets): mislabels (AUROC, AP, precision@k, k = corrupted labels)
and, with --duplicates, injected conflicting duplicates against the clean samples (AUROC). Cost:
trainings in sample-epochs relative to one training on all samples (raycurv 1; cleanlab
K - 1, each fold trains on (K - 1)/K of the samples), and wall seconds of each side measured in
the same process one after the other (raycurv's split into training, which every score but
curvature needs alone, and curvature scoring). Combined scores: the mean of two scores' ranks,
kept only if it beats each part on every seed.

    python -m bench.peers --dataset digits --noise 0.1 --seeds 0,1,2,3,4
    python -m bench.peers --dataset fashion-mnist --limit 10000 --noise 0.1 --duplicates 100 --epochs 15

Output ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.model_selection import StratifiedKFold

from bench.quality import (
    add_data_arguments,
    data_spec,
    fit,
    run_scores,
    train_and_score,
    with_terms,
)
from raycurv.config import CurvatureSpec, ScoreSpec, TrainSpec
from raycurv.data import prepare_dataset
from raycurv.data.transforms import to_input
from raycurv.detection import detection, flagging_scores, targets
from raycurv.train import TrainData

COMBINED = (("curvature", "csl"), ("curvature", "aum"), ("csl", "aum"))


def cross_validated_probabilities(spec: ScoreSpec, folds: int, *, log=print) -> dict:
    """Out-of-sample softmax probabilities (N, classes) of ``spec``'s model: each of ``folds``
    stratified folds (by the noisy label, seeded) predicted by a model trained as raycurv trains
    on the other folds. Returns the probabilities and the training and prediction seconds."""
    data = prepare_dataset(spec.data, seed=spec.seed)
    payload = TrainData.of(data)
    probs = np.zeros((len(data), data.num_classes), dtype=np.float64)
    seconds = {"train": 0.0, "predict": 0.0}
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=spec.seed)
    for k, (train_idx, held_idx) in enumerate(split.split(np.zeros(len(data)), data.labels)):
        subset = dataclasses.replace(payload, images=payload.images[train_idx],
                                     labels=payload.labels[train_idx],
                                     sample_ids=payload.sample_ids[train_idx])
        log(f" cleanlab fold {k + 1}/{folds}: training on {len(train_idx)} samples",
            file=sys.stderr, flush=True)
        trained = fit(spec, subset, log=log)
        seconds["train"] += trained["seconds"]
        tic = time.perf_counter()
        probs[held_idx] = _predict(trained["model"], data, held_idx)
        seconds["predict"] += time.perf_counter() - tic
    return {"probs": probs, "seconds": seconds}


def _predict(model, data, positions: np.ndarray, batch: int = 1024) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for a in range(0, len(positions), batch):
            x = to_input(data.images[positions[a:a + batch]], data.norm)
            out.append(model(x).softmax(1).double().numpy())
    return np.concatenate(out)


def cleanlab_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """cleanlab on out-of-sample probabilities: ``cleanlab`` (N,), the negated label-quality
    score (higher = more likely a label issue), and ``flagged`` (N,) bool, its issue set."""
    from cleanlab.filter import find_label_issues  # a benchmark dependency (the test extra)
    from cleanlab.rank import get_label_quality_scores

    return {"cleanlab": -get_label_quality_scores(labels, probs),
            "flagged": find_label_issues(labels, probs)}


def combined(flagged: dict[str, np.ndarray], parts: tuple[str, str]) -> np.ndarray:
    """The mean of the parts' ranks (average ranks for ties; higher = flagged first)."""
    return np.mean([rankdata(np.nan_to_num(np.asarray(flagged[p], np.float64), nan=-np.inf,
                                           posinf=np.finfo(np.float64).max)) for p in parts], axis=0)


def figures(scores: dict[str, np.ndarray], corrupted: np.ndarray, duplicate_of: np.ndarray) -> dict:
    """{score: {target: figures}}: the mislabel figures (auroc, average_precision,
    precision_at_k) and the duplicate AUROC, each score higher = flagged first."""
    found = targets(corrupted, duplicate_of)
    out = {}
    for name, values in scores.items():
        out[name] = {}
        for target, (positives, among) in found.items():
            if positives[among].any():
                m = detection(values, positives, among=among)
                out[name][target] = m if target == "corrupted" else {"auroc": m["auroc"]}
    return out


def compare(spec: ScoreSpec, *, folds: int, probes: int, log=print) -> dict:
    """One seed: raycurv's run and cleanlab's cross-validation, their figures and costs."""
    tic = time.perf_counter()
    run = with_terms(train_and_score(spec, probes=probes, log=log))
    raycurv_wall = time.perf_counter() - tic
    flagged = flagging_scores(run_scores(run))
    tic = time.perf_counter()
    cv = cross_validated_probabilities(spec, folds, log=log)
    labels = prepare_dataset(spec.data, seed=spec.seed).labels
    peer = cleanlab_scores(labels, cv["probs"])
    cleanlab_wall = time.perf_counter() - tic
    scores = {**flagged, "cleanlab": peer["cleanlab"]}
    scores |= {"+".join(parts): combined(flagged, parts) for parts in COMBINED}
    corrupted = run["corrupted"]
    issues = peer["flagged"]
    return {
        "seed": spec.seed, "figures": figures(scores, corrupted, run["duplicate_of"]),
        "find_label_issues": {"flagged": int(issues.sum()),
                              "precision": float(corrupted[issues].mean()) if issues.any() else 0.0,
                              "recall": float(issues[corrupted].mean()) if corrupted.any() else 0.0},
        "train_acc": float(run["train_acc"][-1]),
        "noisy_fit": float((run["train_margin"][-1][corrupted] > 0).mean()) if corrupted.any() else None,
        "cost": {"raycurv": {"trainings": 1.0, "train_s": float(run["seconds"][0]),
                             "score_s": float(run["seconds"][1]), "wall_s": raycurv_wall},
                 "cleanlab": {"trainings": folds - 1.0, "train_s": cv["seconds"]["train"],
                              "predict_s": cv["seconds"]["predict"], "wall_s": cleanlab_wall}},
    }


def summarize(results: list[dict]) -> dict:
    """Means over seeds (and the worst seed) of every figure; which combined scores beat each of
    their parts on every seed (mislabel AUROC, and duplicate AUROC where measured)."""
    names = list(results[0]["figures"])
    out: dict = {"scores": {}}
    for name in names:
        by_target = {}
        for target in results[0]["figures"][name]:
            by_target[target] = {m: {"mean": statistics.mean(r["figures"][name][target][m] for r in results),
                                     "worst": min(r["figures"][name][target][m] for r in results)}
                                 for m in results[0]["figures"][name][target]}
        out["scores"][name] = by_target
    out["combined_earns_its_place"] = {}
    for parts in COMBINED:
        name = "+".join(parts)
        out["combined_earns_its_place"][name] = all(
            r["figures"][name][t]["auroc"] > max(r["figures"][p][t]["auroc"] for p in parts)
            for r in results for t in r["figures"][name])
    raycurv = [r["cost"]["raycurv"] for r in results]
    cleanlab = [r["cost"]["cleanlab"] for r in results]
    out["cost"] = {
        "raycurv_train_s": statistics.mean(c["train_s"] for c in raycurv),
        "raycurv_score_s": statistics.mean(c["score_s"] for c in raycurv),
        "raycurv_wall_s": statistics.mean(c["wall_s"] for c in raycurv),
        "cleanlab_train_s": statistics.mean(c["train_s"] for c in cleanlab),
        "cleanlab_wall_s": statistics.mean(c["wall_s"] for c in cleanlab),
        "cleanlab_trainings": cleanlab[0]["trainings"],
    }
    c = out["cost"]
    c["training_ratio"] = c["raycurv_train_s"] / c["cleanlab_train_s"]
    c["with_curvature_ratio"] = (c["raycurv_train_s"] + c["raycurv_score_s"]) / c["cleanlab_wall_s"]
    return out


def print_summary(summary: dict, results: list[dict]) -> None:
    seeds = len(results)
    dup = any("duplicate" in f for f in results[0]["figures"].values())
    print(f"\n| score | mislabel AUROC (worst of {seeds}) | AP | P@k |"
          + (" duplicate AUROC |" if dup else ""))
    print("|---|---|---|---|" + ("---|" if dup else ""))
    for name, by_target in summary["scores"].items():
        m = by_target["corrupted"]
        cells = [name, f"{m['auroc']['mean']:.4f} ({m['auroc']['worst']:.4f})",
                 f"{m['average_precision']['mean']:.4f}", f"{m['precision_at_k']['mean']:.4f}"]
        if dup:
            cells.append(f"{by_target['duplicate']['auroc']['mean']:.4f}")
        print("| " + " | ".join(cells) + " |")
    issues = [r["find_label_issues"] for r in results]
    print(f"\ncleanlab find_label_issues: {statistics.mean(i['flagged'] for i in issues):.0f} flagged, "
          f"precision {statistics.mean(i['precision'] for i in issues):.4f}, "
          f"recall {statistics.mean(i['recall'] for i in issues):.4f}")
    print(f"training: last-epoch accuracy {statistics.mean(r['train_acc'] for r in results):.4f}"
          + (f", corrupted labels fit {statistics.mean(r['noisy_fit'] for r in results):.4f}"
             if results[0]["noisy_fit"] is not None else ""))
    c = summary["cost"]
    print(f"cost per seed: raycurv 1 training ({c['raycurv_train_s']:.0f} s) + curvature scoring "
          f"({c['raycurv_score_s']:.0f} s); cleanlab {c['cleanlab_trainings']:.0f} training "
          f"equivalents ({c['cleanlab_train_s']:.0f} s training, {c['cleanlab_wall_s']:.0f} s in all)")
    print(f"  raycurv's training / cleanlab's trainings: {c['training_ratio']:.2f}x wall time; "
          f"with curvature scoring: {c['with_curvature_ratio']:.2f}x")
    for name, earned in summary["combined_earns_its_place"].items():
        print(f"  combined {name}: {'beats' if earned else 'does not beat'} each part on every seed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=None, help="default: raycurv's")
    parser.add_argument("--probes", type=int, default=None, help="default: raycurv's")
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args()
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train = TrainSpec(**({"epochs": args.epochs} if args.epochs else {}))
    curv = CurvatureSpec(**({"probes": args.probes} if args.probes else {}))
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        spec = ScoreSpec(seed=seed, data=data_spec(args), train=train, curvature=curv)
        results.append(compare(spec, folds=args.folds, probes=curv.probes))
        print(f"seed {seed}: " + ", ".join(f"{k} {v['corrupted']['auroc']:.4f}"
                                            for k, v in results[-1]["figures"].items()),
              file=sys.stderr, flush=True)
    summary = summarize(results)
    print_summary(summary, results)
    print(json.dumps({"bench": "peers", "dataset": args.dataset, "limit": args.limit,
                      "noise": args.noise, "duplicates": args.duplicates, "seeds": args.seeds,
                      "epochs": train.epochs, "probes": curv.probes, "folds": args.folds,
                      "model": train.model, "wall_seconds": time.perf_counter() - started,
                      **summary, "per_seed": results}))


if __name__ == "__main__":
    main()
