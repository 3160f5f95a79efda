"""The ``suspected`` rule and how right it is where the truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from raycurv.detection import suspected_metrics
from raycurv.suspected import is_suspected, mislabel_score, suspect


def test_each_sample_gets_the_first_kind_that_applies():
    # mislabel ranks by the mislabel score's percentile, atypical by curvature's
    percentile = np.array([0.95, 0.95, 0.95, 0.5, 0.5, 0.9, 0.95, 0.2], np.float32)
    mislabel_percentile = np.array([0.1, 0.95, 0.95, 0.5, 0.5, 0.9, 0.3, 0.97], np.float32)
    label = np.array([1, 1, 2, 2, 3, 4, 5, 6])
    final_pred = np.array([1, 0, 0, 0, 3, 0, 0, 0])
    conflicting = np.array([False, False, True, False, True, False, False, False])
    args = {"percentile": percentile, "mislabel_percentile": mislabel_percentile, "label": label,
            "final_pred": final_pred}
    kinds = suspect(**args, conflicting=conflicting)
    assert kinds.tolist() == ["atypical", "mislabel", "conflicting_duplicate", None,
                              "conflicting_duplicate", "mislabel", None, "mislabel"]
    no_search = suspect(**args, conflicting=None)
    assert no_search.tolist()[2] == "mislabel" and no_search.tolist()[4] is None
    assert suspect(**args, conflicting=None, threshold=0.98).tolist() == [None] * 8
    assert is_suspected(kinds, "mislabel").tolist() == [False, True, False, False, False, True,
                                                        False, True]


def test_the_mislabel_score_is_csl_or_the_final_loss_without_training_records():
    columns = {"csl": np.array([3.0, 1.0, 2.0, 0.5]), "final_loss": np.array([0.1, 0.4, 0.3, 0.2])}
    name, percentile = mislabel_score(columns)
    assert name == "csl" and percentile.tolist() == [0.75, 0.25, 0.5, 0.0]
    name, percentile = mislabel_score(columns | {"csl": np.zeros(4)}, training_records=False)
    assert name == "final_loss" and percentile.tolist() == [0.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize(("change", "message"), [
    ({"label": np.zeros(3)}, r"label has shape \(3,\)"),
    ({"mislabel_percentile": np.zeros(5)}, r"mislabel_percentile has shape \(5,\)"),
    ({"conflicting": np.zeros((6, 1), bool)}, r"conflicting has shape"),
    ({"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
])
def test_bad_arguments_are_one_line(change, message):
    args = {"percentile": np.zeros(6), "mislabel_percentile": np.zeros(6), "label": np.zeros(6),
            "final_pred": np.zeros(6), "conflicting": None} | change
    with pytest.raises(ValueError, match=message):
        suspect(**args)
    with pytest.raises(ValueError, match="unknown kind 'typo'; valid: conflicting_duplicate"):
        is_suspected(np.array([None]), "typo")


def test_precision_and_recall_against_the_injected_truth():
    # samples 0-3 corrupted; 8 copies sample 9 with another label
    columns = {
        "sample_id": np.arange(10),
        "corrupted": np.arange(10) < 4,
        "duplicate_of": np.array([-1] * 8 + [9, -1]),
        "suspected": np.array(["mislabel", "mislabel", None, "atypical", "mislabel", None, None,
                               "atypical", "conflicting_duplicate", "conflicting_duplicate"],
                              dtype=object),
    }
    found = suspected_metrics(columns)
    assert found["mislabel"] == {"flagged": 3, "precision": 2 / 3, "recall": 2 / 4}
    assert found["conflicting_duplicate"] == {"flagged": 2, "precision": 1.0, "recall": 1.0}
    assert found["atypical"] == {"flagged": 2, "corrupted_share": 0.5}


def test_the_duplicate_search_can_be_switched_off():
    from raycurv.cli import build_parser
    from raycurv.commands.score import build_spec
    from raycurv.results import conflicting_duplicates

    args = build_parser().parse_args(["score", "--no-duplicate-search", "--limit", "20"])
    spec = build_spec(args)
    assert spec.data.duplicate_search is False
    assert conflicting_duplicates(spec, None) == (None, None)  # nothing searched, Ray untouched


def test_evaluate_reports_the_suspected_kinds(tmp_path, capsys):
    from raycurv.cli import main
    from raycurv.runfolder import RunFolder
    from tests.test_table import _with_suspected

    table = _with_suspected()
    RunFolder(str(tmp_path)).write_scores(table)
    assert main(["evaluate", str(tmp_path), "--no-duplicates"]) == 0
    out = capsys.readouterr().out
    flagged = table.column("suspected").to_pylist().count("mislabel")
    assert f"  mislabel{'':<30}{flagged:>8}" in out and "conflicting_duplicate" in out
