"""`raycurv report`: the folder is self-contained (the HTML references only files it wrote, no
network, no scripts), every PNG decodes, and the gallery lists the top samples in rank order."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycurv.cli import main
from tests.test_evaluate import fake_reference, fake_run

TOP = 25


class _Links(HTMLParser):
    """Every src/href and the gallery rows' data-rank / data-sample-id, in document order."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.rows: list[tuple[int, int]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag == "tr" and "data-rank" in attrs:
            self.rows.append((int(attrs["data-rank"]), int(attrs["data-sample-id"])))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir, data = fake_run(tmp_path_factory.mktemp("runs") / "digits")
    flagged = (data.corrupted | (data.duplicate_of >= 0)).astype(float)
    ref = fake_reference(run_dir / "reference.parquet", data, flagged * 0.8)
    assert main(["report", str(run_dir), "--top", str(TOP), "--reference", ref]) == 0
    return run_dir, run_dir / "report"


def test_html_references_only_files_it_wrote(report):
    _, out = report
    parser = _Links()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert parser.links and set(parser.links) <= written
    for link in parser.links:
        assert "://" not in link and not link.startswith(("/", "..")) and ".." not in Path(link).parts
    assert "script" not in parser.tags and "link" not in parser.tags
    assert written - set(parser.links) == {"index.html"}  # nothing written but unused
    expected = {"histogram.png", "roc.png", "csl.png", "per_class.png", "epochs.png", "reference.png"}
    assert expected <= written


def test_every_png_decodes(report):
    _, out = report
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) >= TOP + 6
    for path in pngs:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG" and min(img.size) > 0


def test_gallery_lists_top_samples_in_rank_order(report):
    run_dir, out = report
    parser = _Links()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    table = pq.read_table(run_dir / "scores.parquet").to_pandas().sort_values("rank")
    assert [r for r, _ in parser.rows] == list(range(1, TOP + 1))
    assert [s for _, s in parser.rows] == table["sample_id"].head(TOP).tolist()
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "conflicting labels" in html and "injected copy of" in html and "corrupted label" in html


def test_report_is_replaced_whole_and_bad_input_fails(report, capsys, tmp_path):
    run_dir, out = report
    (out / "stale.txt").write_text("old")
    assert main(["report", str(run_dir), "--top", "3", "--no-duplicates", "--epochs", "1:3"]) == 0
    assert not (out / "stale.txt").exists() and not (out / "epochs.png").exists()
    parser = _Links()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    assert len(parser.rows) == 3
    for argv, message in ((["report", str(tmp_path / "none")], "no score table"),
                          (["report", str(run_dir), "--top", "0"], "--top must be at least 1"),
                          (["report", str(run_dir), "--epochs", "9:12"], "hold no scored epoch")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".report.")]  # no temp folders


def test_the_epochs_figure_reads_the_top_samples_and_a_band_sample_only(report):
    """A run larger than the band sample: only the top samples' and the sampled rows are read."""
    from raycurv.evaluate import load_run_table, table_columns
    from raycurv.report import epoch_rows

    run_dir, _ = report
    folder, table = load_run_table(str(run_dir))
    cols = table_columns(table)
    rows = epoch_rows(folder, cols, top=3, band=50)
    shown = np.unique(rows.column("sample_id").to_numpy())
    top = cols["sample_id"][np.argsort(-cols["curvature"], kind="stable")[:3]]
    assert set(top) <= set(shown) and 50 <= len(shown) <= 53
    assert epoch_rows(folder, cols, band=len(cols["sample_id"])).num_rows == folder.read_by_epoch().num_rows
