"""Where curvature's mislabel ceiling comes from: curvature against the model's confidence in
the label, read from one stored run with injected label noise.

The loss ranks a sample by one number, p_y = exp(-final_loss), the model's probability of the
label it was trained on, and ranks it monotonically: the less the model believes the label, the
higher. Curvature is a different function of the same model around x. This benchmark takes the
last scored epoch's curvature (the model that gave ``final_loss``) and asks how much of its
ranking p_y explains, and where the two part:

- AUROC of finding the corrupted labels (and injected conflicting copies, raycurv.detection's
  targets): curvature of the last epoch, of the run (mean over epochs), final loss, and
  *curvature through p_y*: every sample's curvature replaced by the median curvature of the
  samples with a p_y close to its own (``--bins`` quantile bins of p_y, corrupted and clean
  pooled). Close to the loss's AUROC: the part of curvature that follows confidence ranks as
  the loss does, and what curvature loses against it is its spread at a given confidence;
- the same per scored epoch, from each epoch's loss in the run's per-epoch table, with the
  number of clean samples that epoch's model gives p_y < 0.5, and whether the spread persists: the
  correlation of each sample's spread (log curvature over curvature through p_y) between one
  scored epoch and the next, and its standard deviation in one epoch against that of its mean
  over the epochs (averaging epochs removes only the part that does not persist), and the
  AUROC of curvature, curvature through p_y and the loss, each averaged over the epochs;
- per p_y range: clean (neither corrupted nor an injected copy) and corrupted samples, the
  median curvature percentile of each, and curvature's AUROC within the range (does it
  separate samples the model is equally sure of?);
- the clean samples in the top k of each score (k = corrupted labels): how many, and their
  median p_y; for curvature, the (label, prediction) class pairs most frequent among them.

    python -m bench.ceiling runs/fmnist10k
    python -m bench.ceiling runs/fmnist5k --reference runs/fmnist5k/reference.parquet

With ``--reference`` (a clean run), the same question for agreement with Feldman-Zhang: how
curvature, final loss, curvature through p_y and *curvature beyond p_y* (the last epoch's
curvature over its p_y bin's median: what confidence does not explain) agree with mem.

Output ends with one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import numpy as np
from scipy.stats import spearmanr

from raycurv.agreement import agreement, join_reference, top_k_count
from raycurv.class_names import class_names
from raycurv.detection import detection, targets
from raycurv.evaluate import load_run_table, read_epoch_window
from raycurv.reference import read_reference
from raycurv.table import rank_and_percentile, read_metadata

RANGES = (0.0, 0.05, 0.2, 0.5, 0.8, 0.95, 1.0)  # p_y ranges of the per-range table


def through_confidence(curvature: np.ndarray, p_y: np.ndarray, bins: int) -> np.ndarray:
    """(N,) the median curvature of each sample's p_y quantile bin (higher = flagged first)."""
    edges = np.quantile(p_y, np.linspace(0, 1, bins + 1)[1:-1])
    which = np.searchsorted(edges, p_y, side="right")
    medians = np.array([np.median(curvature[which == b]) if (which == b).any() else np.nan
                        for b in range(bins)])
    return medians[which]


def by_range(curvature: np.ndarray, p_y: np.ndarray, corrupted: np.ndarray,
             clean: np.ndarray) -> list[dict]:
    """One row per p_y range of RANGES: counts, median curvature percentile (of all samples),
    and curvature's AUROC of the corrupted against the clean samples within the range."""
    pct = rank_and_percentile(curvature)[1]  # the table's percentile: share strictly lower
    rows = []
    for low, high in zip(RANGES[:-1], RANGES[1:], strict=True):
        inside = (p_y >= low) & ((p_y < high) | (high == RANGES[-1]))
        bad, good = inside & corrupted, inside & clean
        both = bad.sum() >= 10 and good.sum() >= 10
        rows.append({
            "p_y": f"{low:.2f}-{high:.2f}", "clean": int(good.sum()), "corrupted": int(bad.sum()),
            "clean_median_pct": float(np.median(pct[good])) if good.any() else None,
            "corrupted_median_pct": float(np.median(pct[bad])) if bad.any() else None,
            "auroc_within": float(detection(curvature, corrupted, among=bad | good)["auroc"])
            if both else None})
    return rows


def false_positives(score: np.ndarray, corrupted: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Positions of the clean samples among the k = corrupted highest ``score``."""
    top = np.argsort(-score, kind="stable")[:int(corrupted.sum())]
    return top[clean[top]]


def agreement_through_confidence(table, reference: str, scores: dict[str, np.ndarray], *,
                                 top_k: float) -> dict[str, dict[str, float]]:
    """raycurv.agreement's figures of each of ``scores`` (N,) (aligned with ``table``) against
    the reference's mem, on the samples where mem is defined."""
    ref = read_reference(reference)[0]
    joined = join_reference(table, ref)
    mem = joined["mem"]
    rows = np.searchsorted(table.column("sample_id").to_numpy(), joined["sample_id"])
    k = top_k_count(top_k, len(mem))
    return {name: agreement(values[rows], mem, k) for name, values in scores.items()}


def epoch_records(folder, sample_ids: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Epoch -> ((N,) curvature, (N,) loss of the model scored at that epoch) on every sample
    (``sample_ids`` order), from one read of the run's per-epoch table; epochs some sample has
    no loss for are left out, and all of them where the table holds no loss (a run written
    before it did)."""
    out: dict[int, np.ndarray] = {}  # epoch -> (2, N): curvature, loss
    for batch in folder.iter_by_epoch_with_loss() or []:
        epochs = batch.column("epoch").to_numpy()
        ids = batch.column("sample_id").to_numpy()
        values = np.stack([batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                           for name in ("curvature", "loss")])  # a null loss: NaN
        for epoch in np.unique(epochs):
            at = epochs == epoch
            into = out.setdefault(int(epoch), np.full((2, len(sample_ids)), np.nan))
            into[:, np.searchsorted(sample_ids, ids[at])] = values[:, at]
    return {epoch: (both[0], both[1]) for epoch, both in sorted(out.items())
            if not np.isnan(both).any()}


def by_epoch(folder, table, positives: np.ndarray, clean: np.ndarray,
             bins: int) -> tuple[list[dict], dict]:
    """Per scored epoch: curvature's, the loss's and curvature-through-p_y's mislabel AUROC, how
    many clean samples that epoch's model gives p_y < 0.5, and how its spread (log of curvature
    over curvature through p_y) correlates with the next scored epoch's; and over the epochs,
    the spread's standard deviation in one epoch (mean over epochs) and of its mean over the
    epochs (close together when the spread is a property of the sample, not of one epoch), and
    the AUROC of curvature, curvature through p_y and the loss averaged over the epochs."""
    rows, spreads = [], []
    sums = {name: np.zeros(len(table)) for name in ("curvature", "curvature_through_p_y", "loss")}
    for epoch, (curvature, loss) in epoch_records(folder, table.column("sample_id").to_numpy()).items():
        p_y = np.exp(-loss)
        through = through_confidence(curvature, p_y, bins)
        for name, values in (("curvature", curvature), ("curvature_through_p_y", through),
                             ("loss", loss)):
            sums[name] += values
        spreads.append(np.log(np.maximum(curvature, 1e-30) / np.maximum(through, 1e-30)))
        rows.append({"epoch": epoch, "unsure_clean": int(((p_y < 0.5) & clean).sum()),
                     **{name: float(detection(values, positives)["auroc"]) for name, values in (
                         ("curvature", curvature), ("loss", loss),
                         ("curvature_through_p_y", through))}})
    for row, now, following in zip(rows, spreads, spreads[1:], strict=False):
        row["spread_corr_next"] = float(np.corrcoef(now, following)[0, 1])
    persistence = {} if not spreads else {
        "spread_std_one_epoch": float(np.mean([s.std() for s in spreads])),
        "spread_std_of_mean": float(np.mean(spreads, axis=0).std()),
        # each per-epoch score summed over the epochs (the order of the mean): the run's
        # curvature, what it would score without its spread, and the eval loss's csl
        "auroc_over_epochs": {name: float(detection(total, positives)["auroc"])
                              for name, total in sums.items()}}
    return rows, persistence


def analyze(run: str, *, bins: int, reference: str | None = None, top_k: float = 0.1) -> dict:
    folder, table = load_run_table(run)
    last = int(np.max(folder.read_by_epoch().column("epoch").to_numpy()))
    last_table = read_epoch_window(folder, table, f"{last}:")  # the table read once
    col = lambda t, name: t.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    curv_last = col(last_table, "curvature").astype(np.float64)
    curv_mean = col(table, "curvature").astype(np.float64)
    loss = col(table, "final_loss").astype(np.float64)
    p_y = np.exp(-loss)
    labels, preds = col(table, "label"), col(table, "final_pred")
    names = class_names(read_metadata(table)) or tuple(str(c) for c in range(int(labels.max()) + 1))
    found = targets(col(table, "corrupted").astype(bool),
                    table.column("duplicate_of").fill_null(-1).to_numpy())
    through = through_confidence(curv_last, p_y, bins)
    auroc = {target: {name: float(detection(values, positives, among=among)["auroc"])
                      for name, values in (
                          ("curvature_run", curv_mean), ("curvature_last_epoch", curv_last),
                          ("final_loss", loss), ("curvature_through_p_y", through))}
             for target, (positives, among) in found.items() if positives[among].any()}
    out = {"run": run, "last_epoch": last, "samples": len(table), "bins": bins,
           "spearman_curvature_vs_loss": float(spearmanr(curv_last, loss).statistic)}
    if reference is not None:
        out["agreement"] = agreement_through_confidence(
            table, reference, {"curvature_run": curv_mean, "curvature_last_epoch": curv_last,
                               "final_loss": loss, "curvature_through_p_y": through,
                               "curvature_beyond_p_y": curv_last / through}, top_k=top_k)
    if not auroc:
        return out
    corrupted = found["corrupted"][0]
    clean = ~corrupted & ~found["duplicate"][0]  # neither corrupted nor an injected copy
    epochs, persistence = by_epoch(folder, table, corrupted, clean, bins)
    fp = {name: false_positives(values, corrupted, clean)
          for name, values in (("curvature_last_epoch", curv_last), ("final_loss", loss))}
    pairs = collections.Counter(
        f"{names[labels[i]]} as {names[preds[i]]}" if labels[i] != preds[i] else
        f"{names[labels[i]]} (predicted right)" for i in fp["curvature_last_epoch"])
    return {
        **out, "corrupted": int(corrupted.sum()), "auroc": auroc,
        "by_epoch": epochs, "spread_persistence": persistence,
        "by_p_y": by_range(curv_last, p_y, corrupted, clean),
        "top_k_clean": {name: {"count": int(len(idx)),
                               "median_p_y": float(np.median(p_y[idx])) if len(idx) else None,
                               "right": int((labels[idx] == preds[idx]).sum())}
                        for name, idx in fp.items()},
        "top_k_clean_pairs": pairs.most_common(6),
    }


def report(r: dict) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"{r['run']}: {r['samples']} samples, {r.get('corrupted', 0)} corrupted labels, "
             f"last epoch {r['last_epoch']}",
             f"Spearman of last-epoch curvature with final loss: "
             f"{r['spearman_curvature_vs_loss']:.3f}"]
    for target, a in r.get("auroc", {}).items():
        lines.append(f"{target} AUROC: " + "curvature (run) {curvature_run:.4f}, curvature (last "
                     "epoch) {curvature_last_epoch:.4f}, final loss {final_loss:.4f}, curvature "
                     "through p_y {curvature_through_p_y:.4f}".format(**a) + f" ({r['bins']} bins)")
    if "by_p_y" in r:
        lines += ["", f"{'p_y':>10} {'clean':>6} {'corrupted':>9} {'curv pct clean':>15} "
                      f"{'corrupted':>9} {'AUROC within':>12}"]
        for row in r["by_p_y"]:
            lines.append(f"{row['p_y']:>10} {row['clean']:>6} {row['corrupted']:>9} "
                         f"{fmt(row['clean_median_pct'], '.3f'):>15} "
                         f"{fmt(row['corrupted_median_pct'], '.3f'):>9} "
                         f"{fmt(row['auroc_within'], '.4f'):>12}")
        lines.append("")
        for name, fp in r["top_k_clean"].items():
            lines.append(f"clean samples in {name}'s top {r['corrupted']}: {fp['count']} (median "
                         f"p_y {fmt(fp['median_p_y'], '.3f')}; predicted right: {fp['right']})")
        lines.append("curvature's, by (label, prediction): " + ", ".join(
            f"{pair} {n}" for pair, n in r["top_k_clean_pairs"]))
    if "by_epoch" in r and not r["by_epoch"]:
        lines += ["", "per-epoch figures left out: the run's per-epoch table holds no loss "
                      "(written before raycurv recorded it)"]
    if r.get("by_epoch"):
        lines += ["", "epoch  clean samples with p_y < 0.5  mislabel AUROC: curvature  loss  "
                      "curvature through p_y  spread's correlation with the next epoch's"]
        lines += [f"{e['epoch']:>5} {e['unsure_clean']:>29} {e['curvature']:>26.4f} "
                  f"{e['loss']:>5.4f} {e['curvature_through_p_y']:>22.4f} "
                  f"{fmt(e.get('spread_corr_next'), '.2f'):>44}" for e in r["by_epoch"]]
        p = r["spread_persistence"]
        lines.append(f"spread (log curvature / curvature through p_y): std in one epoch "
                     f"{p['spread_std_one_epoch']:.3f}, std of its mean over the epochs "
                     f"{p['spread_std_of_mean']:.3f}")
        lines.append("mislabel AUROC of the mean over the epochs: " + ", ".join(
            f"{name} {value:.4f}" for name, value in p["auroc_over_epochs"].items()))
    if "agreement" in r:
        lines += ["", f"{'agreement with the reference':<28} {'cosine':>7} {'top-k cos':>9} "
                      f"{'Pearson':>8} {'Spearman':>8} {'top-k overlap':>13}"]
        for name, a in r["agreement"].items():
            lines.append(f"{name:<28} {a['cosine']:>7.3f} {a['cosine_top_k']:>9.3f} "
                         f"{a['pearson']:>8.3f} {a['spearman']:>8.3f} {a['top_k_overlap']:>13.3f}")
        lines.append("(cosine says nothing of curvature_beyond_p_y: a ratio near 1 for every sample)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder with injected label noise, or any with --reference")
    parser.add_argument("--reference", help="a Feldman-Zhang reference table of the run")
    parser.add_argument("--top-k", type=float, default=0.1, help="as raycurv evaluate's")
    parser.add_argument("--bins", type=int, default=20, help="p_y quantile bins (default 20)")
    args = parser.parse_args(argv)
    if args.bins < 2:
        parser.error("--bins must be at least 2")
    result = analyze(args.run, bins=args.bins, reference=args.reference, top_k=args.top_k)
    if "auroc" not in result and args.reference is None:
        parser.error(f"{args.run} has no injected noise or duplicates: give it --reference")
    print(report(result), end="\n\n", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
