"""The visual report of a run: PNG figures and an HTML gallery of the most memorized samples, in
one self-contained folder (relative links only, no scripts, nothing fetched from the network), so
it opens offline in any browser.

Figures (higher curvature = more memorized throughout):
  histogram.png   curvature of clean samples, corrupted labels and injected duplicates (log x)
  roc.png         ROC of every score (curvature, csl, final loss, the training-dynamics
                  co-scores, in raycurv.detection's direction) for the corrupted labels and
                  injected duplicates (only where the run injected them, so the truth is known)
  csl.png         curvature against csl, per sample (log-log)
  per_class.png   curvature per given label (box plots)
  epochs.png      per-epoch curvature of the 10 highest-ranked samples against the median and
                  10-90 % band of all samples (needs the per-epoch table)
  reference.png   curvature against a Feldman-Zhang reference's mem (with --reference)
index.html: the run's settings, its metrics, the figures, and the top samples in rank order
(image, given label, original label, prediction, curvature, csl, aum, forgetting events, the
epoch learned for good, duplicate group).
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from raycurv import storage
from raycurv.agreement import join_reference
from raycurv.class_names import class_names
from raycurv.data.plane import StoreImages
from raycurv.detection import flagging_scores
from raycurv.duplicates import NEAR_THRESHOLD, find_duplicates
from raycurv.errors import UsageError
from raycurv.evaluate import collect_metrics, format_run, load_run_table, table_columns
from raycurv.pixels import to_image
from raycurv.reference import read_reference
from raycurv.rundata import load_run_data
from raycurv.runfolder import RunFolder
from raycurv.table import read_metadata

COLORS = {"clean": "#4c72b0", "corrupted": "#dd5151", "duplicate": "#e39b22"}
BAND_SAMPLES = 20_000  # samples the per-epoch figure's band is drawn from, at most


def pyplot():
    """pyplot on the file-only Agg backend (chosen before pyplot loads; no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path.name


def _groups(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Masks (N,) of the sample kinds present: clean, corrupted, duplicate (injected copies)."""
    dup = cols["duplicate_of"] >= 0
    out = {"clean": ~cols["corrupted"] & ~dup, "corrupted": cols["corrupted"], "duplicate": dup}
    return {k: v for k, v in out.items() if v.any()}


def _log_bins(values: np.ndarray, count: int = 60) -> np.ndarray:
    positive = values[values > 0]
    low = positive.min() if len(positive) else 1e-6
    high = max(values.max(), low * 10)
    return np.geomspace(low, high, count)


def histogram_figure(cols: dict[str, np.ndarray], path: Path) -> str:
    """Histogram of curvature per kind of sample (clean / corrupted / duplicate), log x."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    bins = _log_bins(cols["curvature"])
    for kind, mask in _groups(cols).items():
        ax.hist(np.maximum(cols["curvature"][mask], bins[0]), bins=bins, alpha=0.6,
                color=COLORS[kind], label=f"{kind} ({int(mask.sum())})")
    ax.set(xscale="log", yscale="log", xlabel="curvature (higher = more memorized)",
           ylabel="samples", title="Curvature by kind of sample")
    ax.legend()
    return _save(fig, path)


def roc_figure(cols: dict[str, np.ndarray], path: Path) -> str | None:
    """ROC curves of every score for the known targets; None when no noise was injected."""
    clean = ~cols["corrupted"]
    targets = [(name, mask, target) for name, mask, target in (
        ("corrupted labels", np.ones_like(clean), cols["corrupted"]),
        ("injected duplicates (vs clean)", clean, cols["duplicate_of"] >= 0))
        if target[mask].any() and not target[mask].all()]
    if not targets:
        return None
    plt = pyplot()
    flagged = {name: np.nan_to_num(np.asarray(values, np.float64), nan=-np.inf, posinf=np.finfo(np.float64).max,
                                   neginf=np.finfo(np.float64).min)
               for name, values in flagging_scores(cols).items()}
    fig, axes = plt.subplots(1, len(targets), figsize=(4.6 * len(targets), 4.2), squeeze=False)
    for ax, (name, mask, target) in zip(axes[0], targets, strict=True):
        for score, values in flagged.items():
            fpr, tpr, _ = roc_curve(target[mask], values[mask])
            auc = roc_auc_score(target[mask], values[mask])
            ax.plot(fpr, tpr, label=f"{score} (AUROC {auc:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"Finding {name}")
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def csl_figure(cols: dict[str, np.ndarray], path: Path) -> str:
    """Scatter of curvature against csl (cumulative training loss), per kind, log-log."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    floor = _log_bins(cols["curvature"])[0]
    for kind, mask in _groups(cols).items():
        ax.scatter(np.maximum(cols["csl"][mask], 1e-6), np.maximum(cols["curvature"][mask], floor),
                   s=6, alpha=0.5, color=COLORS[kind], label=kind, linewidths=0)
    ax.set(xscale="log", yscale="log", xlabel="csl (cumulative training loss)",
           ylabel="curvature", title="Curvature against csl")
    ax.legend()
    return _save(fig, path)


def per_class_figure(cols: dict[str, np.ndarray], names: tuple[str, ...] | None, path: Path,
                     max_classes: int = 50) -> str:
    """Box plots of curvature per given label; past ``max_classes``, the classes with the
    highest median curvature."""
    plt = pyplot()
    classes = np.unique(cols["label"])
    medians = np.array([np.median(cols["curvature"][cols["label"] == c]) for c in classes])
    shown = classes[np.sort(np.argsort(-medians, kind="stable")[:max_classes])]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(shown) + 2), 4.0))
    ax.boxplot([cols["curvature"][cols["label"] == c] for c in shown], showfliers=True,
               flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(shown) + 1),
                  [names[c] if names and c < len(names) else str(c) for c in shown],
                  rotation=45 if names else 0, ha="right" if names else "center", fontsize=8)
    ax.set(yscale="log", xlabel="given label", ylabel="curvature",
           title="Curvature per class" + ("" if len(shown) == len(classes) else
                                          f" ({len(shown)} of {len(classes)}, highest medians)"))
    return _save(fig, path)


def epochs_figure(by_epoch: pa.Table, cols: dict[str, np.ndarray], path: Path, top: int = 10) -> str:
    """Per-epoch curvature of the ``top`` highest-ranked samples, against the median and the
    10-90 % band of the samples ``by_epoch`` holds (every sample, or a sample of them: see
    :func:`epoch_rows`)."""
    plt = pyplot()
    ids, epoch = by_epoch.column("sample_id").to_numpy(), by_epoch.column("epoch").to_numpy()
    values = by_epoch.column("curvature").to_numpy()
    epochs, present = np.unique(epoch), np.unique(ids)
    grid = np.full((len(epochs), len(present)), np.nan)  # (epochs, samples shown)
    grid[np.searchsorted(epochs, epoch), np.searchsorted(present, ids)] = values
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    band = "all samples" if len(present) >= len(cols["sample_id"]) else f"{len(present):,} samples"
    low, mid, high = np.nanquantile(grid, [0.1, 0.5, 0.9], axis=1)
    ax.fill_between(epochs, low, high, color="grey", alpha=0.25, label=f"{band}, 10-90 %")
    ax.plot(epochs, mid, color="black", lw=1.5, label=f"{band}, median")
    for pos in np.argsort(-cols["curvature"], kind="stable")[:top]:
        column = np.searchsorted(present, cols["sample_id"][pos])
        ax.plot(epochs, grid[:, column], lw=1, alpha=0.85, marker=".",
                label=f"sample {cols['sample_id'][pos]}")
    ax.set(yscale="log", xlabel="epoch", ylabel="curvature",
           title=f"Per-epoch curvature of the top {top} samples")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def epoch_rows(folder: RunFolder, cols: dict[str, np.ndarray], *, top: int = 10,
               band: int = BAND_SAMPLES) -> pa.Table | None:
    """The per-epoch rows the epochs figure draws: the ``top`` highest-ranked samples and, for
    the band, every sample or a seeded sample of ``band`` of them (a run of millions of samples
    and hundreds of epochs is never read whole)."""
    ids = cols["sample_id"]
    if len(ids) <= band:
        return folder.read_by_epoch()
    chosen = np.random.default_rng(0).choice(len(ids), size=band, replace=False)
    shown = np.union1d(ids[chosen], ids[np.argsort(-cols["curvature"], kind="stable")[:top]])
    return folder.read_by_epoch(sample_ids=shown)


def reference_figure(cols: dict[str, np.ndarray], joined: dict[str, np.ndarray], path: Path) -> str:
    """Scatter of curvature against the reference's mem, per kind of sample."""
    plt = pyplot()
    pos = np.searchsorted(cols["sample_id"], joined["sample_id"])
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    for kind, mask in _groups(cols).items():
        sel = mask[pos]
        ax.scatter(joined["mem"][sel], joined["curvature"][sel], s=6, alpha=0.5,
                   color=COLORS[kind], label=kind, linewidths=0)
    ax.set(yscale="log", xlabel="Feldman-Zhang mem (reference)", ylabel="curvature",
           title="Curvature against the reference")
    ax.legend()
    return _save(fig, path)


def _thumbnail(image: np.ndarray, scale: float, path: Path, side: int = 64) -> str:
    """Write one (C, H, W) image as a PNG, upscaled (nearest) to about ``side`` pixels."""
    img = to_image(image, scale)
    factor = max(1, side // max(img.size))
    img.resize((img.width * factor, img.height * factor), Image.NEAREST).save(path)
    return f"images/{path.name}"


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}
.gallery td{vertical-align:middle}.gallery img{image-rendering:pixelated;border:1px solid #ccc}
figure{display:inline-block;margin:0 1em 1em 0}pre{background:#f6f6f6;padding:1em}
.bad{color:#b00;font-weight:600}"""


def _label(value: int, names: tuple[str, ...] | None) -> str:
    return f"{value} ({names[value]})" if names and 0 <= value < len(names) else str(value)


def _group_cell(pos: int, dups, cols: dict[str, np.ndarray], names, thumbs: dict[int, str]) -> str:
    """The duplicate group of position ``pos``: kind, a conflict mark, each partner's image and label."""
    if dups is None:
        return "not searched"
    gid = int(dups.group[pos])
    if gid < 0:
        return "-"
    g = dups.groups[gid]
    parts = [f"group {gid} ({g.kind})", '<span class="bad">conflicting labels</span>' if g.conflicting else ""]
    for m in g.members:
        if m == pos:
            continue
        sid = int(cols["sample_id"][m])
        img = f'<img src="{thumbs[sid]}" alt="sample {sid}" width="32"> ' if sid in thumbs else ""
        parts.append(f"{img}{sid}: {html.escape(_label(int(cols['label'][m]), names))}")
    return " ".join(p for p in parts if p)


def _co_score_cell(cols: dict[str, np.ndarray], name: str, pos: int) -> str:
    """A co-score's value, '-' where the table has none (NaN, or a 1.0 table); a null
    learned_epoch with a training record reads 'never'."""
    value = float(cols[name][pos]) if name in cols else float("nan")
    if name == "learned_epoch" and np.isnan(value) and not np.isnan(float(cols["aum"][pos])):
        return "never"
    if np.isnan(value):
        return "-"
    return f"{value:.3f}" if name == "aum" else str(int(value))


def gallery_rows(cols: dict[str, np.ndarray], top: int, names, dups, thumbs: dict[int, str]) -> list[str]:
    """One <tr> per sample among the ``top`` highest curvature, in rank order (rank 1 first)."""
    rows = []
    for rank, pos in enumerate(np.argsort(-cols["curvature"], kind="stable")[:top], start=1):
        sid, label, orig = int(cols["sample_id"][pos]), int(cols["label"][pos]), int(cols["original_label"][pos])
        notes = ["corrupted label"] if cols["corrupted"][pos] else []
        if cols["duplicate_of"][pos] >= 0:
            notes.append(f"injected copy of {int(cols['duplicate_of'][pos])}")
        img = f'<img src="{thumbs[sid]}" alt="sample {sid}">' if sid in thumbs else "-"
        cells = [str(rank), img, str(sid), html.escape(_label(label, names)),
                 html.escape(_label(orig, names)), html.escape(_label(int(cols["final_pred"][pos]), names)),
                 f"{cols['curvature'][pos]:.4g}", f"{cols['percentile'][pos]:.4f}", f"{cols['csl'][pos]:.4g}",
                 *(_co_score_cell(cols, name, pos) for name in ("aum", "forgetting_events", "learned_epoch")),
                 _group_cell(pos, dups, cols, names, thumbs), html.escape("; ".join(notes))]
        rows.append(f'<tr data-rank="{rank}" data-sample-id="{sid}">'
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return rows


def render_html(title: str, settings: dict[str, Any], metrics_text: str,
                figures: list[tuple[str, str]], rows: list[str]) -> str:
    """The page: settings, metrics (preformatted), figures (file, caption), gallery rows."""
    head = ["rank", "image", "sample_id", "given label", "original label", "prediction",
            "curvature", "percentile", "csl", "aum", "forgetting events", "learned (epoch)",
            "duplicate group", "notes"]
    setting_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                           for k, v in settings.items())
    figs = "".join(f'<figure><img src="{f}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
                   f"</figcaption></figure>" for f, c in figures)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n<h2>Settings</h2><table>{setting_rows}</table>\n"
            f"<h2>Metrics</h2><pre>{html.escape(metrics_text)}</pre>\n<h2>Figures</h2>{figs}\n"
            f"<h2>Most memorized samples (highest curvature first)</h2>\n<table class=\"gallery\">"
            f"<thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead>\n<tbody>\n"
            + "\n".join(rows) + "\n</tbody></table>\n</body></html>\n")


def _settings(meta: dict[str, Any], table: pa.Table) -> dict[str, Any]:
    keys = ("run", "dataset", "n", "classes", "noise", "model", "variant", "h", "probes", "epochs",
            "seed", "created", "raycurv_version")
    shown = {k: meta[k] if isinstance(meta[k], str) else json.dumps(meta[k]) for k in keys if k in meta}
    return shown | {"samples in table": table.num_rows}


def _thumbnails(data, cols: dict[str, np.ndarray], top: int, dups, folder: Path) -> dict[int, str]:
    """PNGs of the top samples and of their duplicate-group partners: sample_id -> relative path."""
    folder.mkdir()
    shown = set(np.argsort(-cols["curvature"], kind="stable")[:top].tolist())
    if dups is not None:
        groups = {int(dups.group[p]) for p in shown if dups.group[p] >= 0}
        shown |= {int(m) for g in groups for m in dups.groups[g].members}
    return {int(cols["sample_id"][p]): _thumbnail(data.image_at(p), data.norm.scale,
                                                  folder / f"{int(cols['sample_id'][p])}.png")
            for p in sorted(shown)}


def _figures(cols, by_epoch, joined, names, out: Path) -> list[tuple[str, str]]:
    figures = [(histogram_figure(cols, out / "histogram.png"), "Curvature by kind of sample")]
    roc = roc_figure(cols, out / "roc.png")
    if roc:
        figures.append((roc, "ROC curves where the truth is known"))
    figures.append((csl_figure(cols, out / "csl.png"), "Curvature against csl"))
    figures.append((per_class_figure(cols, names, out / "per_class.png"), "Curvature per class"))
    if by_epoch is not None:
        figures.append((epochs_figure(by_epoch, cols, out / "epochs.png"), "Per-epoch curvature"))
    if joined is not None:
        figures.append((reference_figure(cols, joined, out / "reference.png"),
                        "Curvature against the Feldman-Zhang reference"))
    return figures


def _write_folder(out: str, fill) -> int:
    """Build the report in a temporary folder with ``fill(folder)``, then publish it; returns
    the number of files. A local report is swapped in whole: a failed one leaves the previous
    report (or nothing), never a half-written folder. On an object store each file is one put,
    index.html last, so the page never links to a file that is not there yet."""
    local = storage.local_path(out)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
        try:
            fill(tmp)
            count = sum(1 for p in tmp.rglob("*") if p.is_file())
            if local.exists():
                shutil.rmtree(local)
            os.replace(tmp, local)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return count
    with tempfile.TemporaryDirectory(prefix="raycurv-report-") as tmp:
        fill(Path(tmp))
        files = sorted((p for p in Path(tmp).rglob("*") if p.is_file()),
                       key=lambda p: (p.name == "index.html", str(p)))
        for path in files:
            storage.write_bytes(storage.join(out, *path.relative_to(tmp).parts), path.read_bytes())
        return len(files)


def make_report(run: str, out: str | None = None, *, top: int = 100, reference: str | None = None,
                epochs: str | None = None, duplicates: bool = True,
                threshold: float | None = None) -> tuple[str, int]:
    """Write the report folder of ``run`` (default RUN/report; local or a URI); returns its
    location and how many files it holds."""
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    folder, table = load_run_table(run, epochs)
    ref = read_reference(reference)[0] if reference else None
    data = load_run_data(folder, table) if folder.read_record() else None
    dups = None
    if data is not None and duplicates:
        images = data.images if data.images is not None else StoreImages(data.store, 0, len(data))
        dups = find_duplicates(images, data.labels, scale=data.norm.scale,
                               threshold=NEAR_THRESHOLD if threshold is None else threshold)
    metrics = collect_metrics(table, reference=ref, dups=dups, epochs=epochs)
    cols = table_columns(table) | {k: table.column(k).to_numpy() for k in ("final_pred", "percentile")}
    by_epoch = epoch_rows(folder, cols) if epochs is None else None
    meta = read_metadata(table)
    names = class_names(meta)
    joined = join_reference(table, ref) if ref is not None else None

    def fill(target: Path) -> None:
        figures = _figures(cols, by_epoch, joined, names, target)
        thumbs = _thumbnails(data, cols, top, dups, target / "images") if data is not None else {}
        rows = gallery_rows(cols, top, names, dups, thumbs)
        page = render_html(f"raycurv report: {meta.get('run', folder.name)}",
                           _settings(meta, table), format_run(metrics), figures, rows)
        (target / "index.html").write_text(page, encoding="utf-8")

    location = out or folder.report
    return location, _write_folder(location, fill)
