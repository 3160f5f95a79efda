"""Detection quality against scoring cost: which probe counts and scored epochs are worth it.

Trains raycurv's model in-process (no Ray: the same data preparation, model, optimizer, schedule
and per-epoch training step as a scoring run), scores every sample after every epoch with n = 10
probes, keeps each probe's term, and then evaluates every setting from those numbers. A sample's
probes are a function of (seed, epoch, sample_id, probe index), so the first n terms of the
n = 10 run ARE an n-probe run, and any set of scored epochs is a subset of the table:

    n            1, 2, 5, 10 probes
    every k-th   epochs e with (E - 1 - e) % k == 0 (the last epoch always scored)
    first K      epochs 0 .. K-1 (scoring stops early)
    last K       epochs E-K .. E-1

Cost is (n + 1) gradient passes per sample per scored epoch, relative to n = 10 on every epoch.
Quality is the AUROC of the score (the mean over scored epochs) for the corrupted labels, and for
injected conflicting duplicates when --duplicates is given (targets as raycurv.detection defines
them, the keys "corrupted" and "duplicate" below).

    python -m bench.quality --dataset digits --noise 0.1 --seeds 0,1,2,3,4
    python -m bench.quality --dataset fashion-mnist --limit 10000 --noise 0.1 --epochs 15
    python -m bench.quality --analyze runs/quality/*.npz   # the tables again, no training

The per-seed per-probe norms (E, 10, N) are written under runs/quality/; the variant's per-probe
terms follow from them (raycurv.curvature.VARIANTS). Output ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from raycurv.config import CurvatureSpec, DataSpec, ScoreSpec, TrainSpec
from raycurv.curvature import VARIANTS, curvature
from raycurv.data import prepare_dataset
from raycurv.data.sharding import scoring_batches
from raycurv.data.transforms import crop_padding, to_input
from raycurv.detection import detection, flagging_scores
from raycurv.detection import targets as detection_targets
from raycurv.dynamics import TRAINING_RECORDS, co_scores
from raycurv.models import SmallCNN, build_model
from raycurv.scoring_model import prepare_for_scoring
from raycurv.train import SCHEDULES, TrainData, _train_epoch, epoch_data

PROBES = (1, 2, 5, 10)


def fit(spec: ScoreSpec, data: TrainData, *, width: int | None = None, on_epoch=None,
        log=print) -> dict:
    """Train on ``data`` as a scoring run does (one worker: raycurv.train's step, optimizer,
    schedule and seeds; ``width``: a small CNN of that width instead of ``spec.train.model``),
    calling ``on_epoch(epoch, model)`` after each epoch. Returns the model, the per-epoch training
    records {TRAINING_RECORDS name: (E, N) float32}, the training accuracy (E,) on the labels
    trained on, and the training seconds (``on_epoch`` not counted)."""
    t = spec.train
    n = len(data.labels)
    torch.manual_seed(spec.seed)
    in_channels, num_classes = data.shape[0], data.num_classes
    model = (SmallCNN(in_channels, num_classes, width=width) if width
             else build_model(t.model, in_channels=in_channels, num_classes=num_classes))
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                          weight_decay=t.weight_decay)
    sched = SCHEDULES[t.schedule](opt, t.epochs)
    training = {name: np.zeros((t.epochs, n), dtype=np.float32) for name in TRAINING_RECORDS}
    accuracy = np.zeros(t.epochs)
    seconds = 0.0
    pad = crop_padding(data.shape[1])
    for epoch in range(t.epochs):
        tic = time.perf_counter()
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch * 1_009)
        batches = epoch_data(data, world=1, rank=0, batch_size=t.batch_size, seed=spec.seed,
                             epoch=epoch)
        records, _, correct = _train_epoch(model, opt, data, batches, device="cpu",
                                           generator=generator, pad=pad)
        sched.step()
        for name, row in zip(TRAINING_RECORDS, records, strict=True):
            training[name][epoch] = row
        accuracy[epoch] = correct / n
        seconds += time.perf_counter() - tic
        if on_epoch is not None:
            on_epoch(epoch, model)
        log(f"  seed {spec.seed} epoch {epoch + 1}/{t.epochs}: train acc {accuracy[epoch]:.3f}, "
            f"loss {records[0].mean():.3f}; {seconds:.0f} s training", file=sys.stderr, flush=True)
    return {"model": model, "training": training, "train_acc": accuracy, "seconds": seconds}


def train_and_score(spec: ScoreSpec, *, probes: int, method: str = "fd", width: int | None = None,
                    log=print) -> dict[str, np.ndarray]:
    """Train as a scoring run does (one worker, see `fit`) and score every sample after every
    epoch. Returns per-epoch, per-probe norms ||d_j|| (E, probes, N), the per-epoch training
    records (raycurv.dynamics.TRAINING_RECORDS: loss, logit margin, probability margin; each
    (E, N)), the training accuracy per epoch (E,) and the last model's loss (N,)."""
    data = prepare_dataset(spec.data, seed=spec.seed)
    c = spec.curvature
    n = len(data)
    norms = np.zeros((spec.train.epochs, probes, n), dtype=np.float32)
    final_loss = np.zeros(n, dtype=np.float32)
    scored = {"seconds": 0.0}
    ids = torch.as_tensor(data.sample_ids)

    def score(epoch: int, model) -> None:
        tic = time.perf_counter()
        scoring = None
        for a, b in scoring_batches(0, n, c.batch_size):
            x = to_input(data.images[a:b], data.norm)
            y = torch.as_tensor(data.labels[a:b])
            scoring = scoring or prepare_for_scoring(model, x)  # as a curvature actor does
            out = curvature(scoring.module, x, y, sample_ids=ids[a:b], epoch=epoch, seed=spec.seed,
                            h=c.h, probes=probes, variant=c.variant, method=method,
                            max_pass=scoring.max_pass)
            norms[epoch, :, a:b] = out.probe_norms.numpy()
            final_loss[a:b] = out.loss.numpy()
        scored["seconds"] += time.perf_counter() - tic

    trained = fit(spec, TrainData.of(data), width=width, on_epoch=score, log=log)
    return {"probe_norms": norms, "h": np.float64(c.h), "variant": np.str_(c.variant),
            **trained["training"], "train_acc": trained["train_acc"], "final_loss": final_loss,
            "corrupted": data.corrupted, "duplicate_of": data.duplicate_of,
            "sample_ids": data.sample_ids,
            "seconds": np.array([trained["seconds"], scored["seconds"]])}


def run_scores(run: dict[str, np.ndarray], epochs: list[int] | None = None) -> dict[str, np.ndarray]:
    """A run's per-sample scores as the score table stores them (raycurv.detection.SCORES:
    curvature, the mean over ``epochs`` (default all) and probes; csl; final_loss; the
    co-scores of raycurv.dynamics); read them with raycurv.detection.flagging_scores."""
    terms = run["terms"] if "terms" in run else with_terms(run)["terms"]
    chosen = slice(None) if epochs is None else epochs
    return {"curvature": terms[chosen].mean(axis=(0, 1)), "csl": run["train_loss"].sum(0),
            "final_loss": run["final_loss"],
            **co_scores(run["train_margin"], run["train_prob_margin"])}


def settings(epochs: int) -> list[tuple[str, list[int]]]:
    """Named sets of scored epochs: every epoch, every k-th, the first K, the last K."""
    out = [("every epoch", list(range(epochs)))]
    for k, ordinal in ((2, "2nd"), (3, "3rd"), (4, "4th"), (6, "6th")):
        if k < epochs:
            out.append((f"every {ordinal}", [e for e in range(epochs) if (epochs - 1 - e) % k == 0]))
    for size in sorted({1, 2, 3, 4, 6, 8, epochs // 4, epochs // 2} - {0}):
        if size < epochs:
            out.append((f"first {size}", list(range(size))))
            out.append((f"last {size}", list(range(epochs - size, epochs))))
    return out


def auroc(scores: np.ndarray, target: np.ndarray) -> float:
    return detection(scores, target)["auroc"]


def targets(run: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Boolean targets and the samples they are told apart from (raycurv.detection's), those
    the run has samples of."""
    found = detection_targets(run["corrupted"], run["duplicate_of"])
    return {name: (positives, among) for name, (positives, among) in found.items()
            if positives[among].any()}


def with_terms(run: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The run with its variant's per-probe terms (E, probes, N), whose mean is the score."""
    norms = torch.from_numpy(run["probe_norms"])
    terms = VARIANTS[str(run["variant"])](norms, float(run["h"])).numpy()
    return {**run, "terms": terms}


def analyze(runs: list[dict[str, np.ndarray]]) -> dict:
    """AUROC and cost of every (n, scored epochs) setting, over seeds."""
    epochs, max_probes = runs[0]["terms"].shape[:2]
    rows = []
    for name, scored in settings(epochs):
        for n in [p for p in PROBES if p <= max_probes]:
            cost = (n + 1) * len(scored) / ((max_probes + 1) * epochs)
            row = {"setting": name, "epochs": scored, "n": n, "cost": cost}
            for target in targets(runs[0]):
                values = []
                for run in runs:
                    is_target, among = targets(run)[target]
                    score = run["terms"][scored, :n].mean(axis=(0, 1))
                    values.append(auroc(score[among], is_target[among]))
                row[target] = values
            rows.append(row)
    reference = next(r for r in rows if r["setting"] == "every epoch" and r["n"] == max_probes)
    full = {r["setting"]: r for r in rows if r["n"] == max_probes}  # the same epochs, all probes
    for row in rows:
        for target in targets(runs[0]):
            row[f"{target}_delta"] = [a - b for a, b in zip(row[target], reference[target], strict=True)]
            row[f"{target}_probe_delta"] = [a - b for a, b in zip(row[target], full[row["setting"]][target],
                                                                  strict=True)]
    by_epoch = {}  # AUROC of the single epoch's score and of the running mean, n = max_probes
    for target in targets(runs[0]):
        single, running = [], []
        for e in range(epochs):
            single.append(statistics.mean(
                auroc(run["terms"][e].mean(0)[targets(run)[target][1]],
                      targets(run)[target][0][targets(run)[target][1]]) for run in runs))
            running.append(statistics.mean(
                auroc(run["terms"][: e + 1].mean(axis=(0, 1))[targets(run)[target][1]],
                      targets(run)[target][0][targets(run)[target][1]]) for run in runs))
        by_epoch[target] = {"single": single, "running_mean": running}
    flagged = [flagging_scores(run_scores(run)) for run in runs]
    baselines = {}  # every other score of raycurv's table, mean AUROC over seeds
    for target in targets(runs[0]):
        baselines[target] = {
            name: statistics.mean(auroc(scores[name][targets(run)[target][1]],
                                        targets(run)[target][0][targets(run)[target][1]])
                                  for run, scores in zip(runs, flagged, strict=True))
            for name in flagged[0] if name != "curvature"}
    return {"rows": rows, "reference": reference, "by_epoch": by_epoch, "baselines": baselines,
            "epochs": int(epochs), "seeds": len(runs), "training": training_summary(runs)}


def training_summary(runs: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """How far training went, mean over seeds: the last epoch's accuracy on the labels trained
    on, and the share of corrupted labels the last epoch's training pass fit (logit margin > 0:
    the model memorized them)."""
    out = {"train_acc": statistics.mean(float(r["train_acc"][-1]) for r in runs if "train_acc" in r)
           if all("train_acc" in r for r in runs) else float("nan")}
    corrupted = [r for r in runs if r["corrupted"].any()]
    out["noisy_fit"] = statistics.mean(float((r["train_margin"][-1][r["corrupted"]] > 0).mean())
                                       for r in corrupted) if corrupted else float("nan")
    return out


def frontier(rows: list[dict], target: str = "corrupted") -> list[dict]:
    """Settings that no other setting beats on both cost and mean AUROC."""
    ordered = sorted(rows, key=lambda r: (r["cost"], -statistics.mean(r[target])))
    out, best = [], -1.0
    for row in ordered:
        if statistics.mean(row[target]) > best:
            out.append(row)
            best = statistics.mean(row[target])
    return out


def print_tables(result: dict, tolerance: float, max_cost: float) -> dict:
    rows, ref = result["rows"], result["reference"]
    names = [t for t in ("corrupted", "duplicate") if t in ref]
    seeds = result["seeds"]
    print(f"\nreference: n = {ref['n']}, every epoch of {result['epochs']}: "
          + ", ".join(f"{t} AUROC {statistics.mean(ref[t]):.4f}" for t in names)
          + f" (mean of {seeds} seed(s))")
    fitted = result["training"]
    print(f"  training: last-epoch accuracy on the labels trained on {fitted['train_acc']:.4f}, "
          f"corrupted labels fit {fitted['noisy_fit']:.4f}")
    for t in names:
        print(f"  baselines ({t}): " + ", ".join(f"{k} {v:.4f}" for k, v in result["baselines"][t].items()))
        print(f"  AUROC by epoch ({t}), single epoch: "
              + " ".join(f"{v:.3f}" for v in result["by_epoch"][t]["single"]))
        print(f"  AUROC by epoch ({t}), running mean: "
              + " ".join(f"{v:.3f}" for v in result["by_epoch"][t]["running_mean"]))
    header = "| scored epochs | n | cost | " + " | ".join(
        f"{t} AUROC | Δ vs reference (worst seed) | Δ vs same epochs, n = {ref['n']}"
        for t in names) + " |"
    print("\n" + header)
    print("|" + "---|" * (3 + 3 * len(names)))
    for row in sorted(rows, key=lambda r: (r["cost"], r["setting"])):
        cells = [row["setting"], str(row["n"]), f"{row['cost']:.3f}"]
        for t in names:
            cells += [f"{statistics.mean(row[t]):.4f}",
                      f"{statistics.mean(row[t + '_delta']):+.4f} ({min(row[t + '_delta']):+.4f})",
                      f"{statistics.mean(row[t + '_probe_delta']):+.4f}"]
        print("| " + " | ".join(cells) + " |")
    front = frontier(rows)
    print("\ncorrupted-label frontier (cost, AUROC): " + "; ".join(
        f"{r['setting']} n={r['n']} {r['cost']:.3f} {statistics.mean(r['corrupted']):.4f}" for r in front))
    ok = [r for r in rows if r["cost"] <= max_cost
          and min(r["corrupted_delta"]) >= -tolerance]
    ok.sort(key=lambda r: (r["cost"], -statistics.mean(r["corrupted"])))
    print(f"\nsettings within {tolerance} of the reference on every seed at <= {max_cost:.0%} of its "
          f"cost: " + ("; ".join(f"{r['setting']} n={r['n']} (cost {r['cost']:.3f}, "
                                  f"Δ {statistics.mean(r['corrupted_delta']):+.4f})" for r in ok)
                       or "none"))
    return {"qualifying": [summary(r) for r in ok], "frontier": [summary(r) for r in front]}


def summary(row: dict) -> dict:
    """A row for the JSON line: means over seeds, and the worst seed's difference."""
    out = {"setting": row["setting"], "n": row["n"], "cost": round(row["cost"], 4)}
    for t in ("corrupted", "duplicate"):
        if t in row:
            out[t] = round(statistics.mean(row[t]), 5)
            out[f"{t}_delta_mean"] = round(statistics.mean(row[f"{t}_delta"]), 5)
            out[f"{t}_delta_worst"] = round(min(row[f"{t}_delta"]), 5)
            out[f"{t}_probe_delta_mean"] = round(statistics.mean(row[f"{t}_probe_delta"]), 5)
    return out


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags the quality benchmarks share: the data, its noise and duplicates, the seeds,
    torch's threads."""
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--duplicates", type=int, default=0)
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--threads", type=int, default=1)


def data_spec(args: argparse.Namespace) -> DataSpec:
    """The DataSpec of `add_data_arguments`' flags."""
    return DataSpec(dataset=args.dataset, limit=args.limit, noise=args.noise,
                    duplicates=args.duplicates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=None, help="default: raycurv's")
    parser.add_argument("--h", type=float, default=None, help="default: raycurv's")
    parser.add_argument("--lr", type=float, default=None, help="default: raycurv's")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: raycurv's")
    parser.add_argument("--schedule", default=None, help="default: raycurv's")
    parser.add_argument("--model", default=None, help="default: raycurv's")
    parser.add_argument("--width", type=int, default=None, help="small CNN width (default 32)")
    parser.add_argument("--variant", default=None, help="default: raycurv's")
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--method", default="fd", help="fd (default) or hvp")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--analyze", nargs="*", default=None, help="saved .npz tables: no training")
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--max-cost", type=float, default=0.30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs, meta = [], {}
    if args.analyze:
        for path in args.analyze:
            with np.load(path) as saved:
                runs.append(with_terms({k: saved[k] for k in saved.files}))
        meta = {"files": args.analyze}
    else:
        defaults = ScoreSpec()
        train = TrainSpec(**{k: v for k, v in (
            ("epochs", args.epochs), ("lr", args.lr), ("weight_decay", args.weight_decay),
            ("schedule", args.schedule), ("model", args.model)) if v is not None})
        curv = CurvatureSpec(h=args.h or defaults.curvature.h,
                             variant=args.variant or defaults.curvature.variant, probes=args.probes)
        os.makedirs(args.out, exist_ok=True)
        for seed in [int(s) for s in args.seeds.split(",")]:
            spec = ScoreSpec(seed=seed, data=data_spec(args), train=train, curvature=curv)
            run = train_and_score(spec, probes=args.probes, method=args.method, width=args.width)
            name = (f"{args.dataset}-n{args.noise}-l{args.limit or 'all'}-d{args.duplicates}"
                    f"-e{train.epochs}-lr{train.lr}-wd{train.weight_decay}-{train.schedule}"
                    f"-{train.model}{args.width or ''}-h{curv.h}-{curv.variant}-{args.method}"
                    f"-s{seed}.npz")
            np.savez_compressed(os.path.join(args.out, name), **run)
            print(f"wrote {os.path.join(args.out, name)} (training {run['seconds'][0]:.0f} s, "
                  f"scoring {run['seconds'][1]:.0f} s)", file=sys.stderr)
            runs.append(with_terms(run))
        meta = {"dataset": args.dataset, "limit": args.limit, "noise": args.noise,
                "duplicates": args.duplicates, "epochs": train.epochs, "h": curv.h,
                "variant": curv.variant, "method": args.method, "seeds": args.seeds, "model": train.model,
                "width": args.width, "lr": train.lr, "weight_decay": train.weight_decay,
                "schedule": train.schedule,
                "train_seconds": float(sum(r["seconds"][0] for r in runs)),
                "score_seconds": float(sum(r["seconds"][1] for r in runs))}
    result = analyze(runs)
    chosen = print_tables(result, args.tolerance, args.max_cost)
    meta["wall_seconds"] = time.perf_counter() - started
    print(json.dumps({
        "bench": "quality", **meta, "tolerance": args.tolerance, "max_cost": args.max_cost,
        "reference": summary(result["reference"]), "by_epoch": result["by_epoch"],
        "baselines": result["baselines"], "training": result["training"], **chosen, "rows": [summary(r) for r in result["rows"]],
    }))


if __name__ == "__main__":
    main()
