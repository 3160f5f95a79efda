"""Detection metrics (raycurv.detection): hand-computed figures, ties, single-class targets and
non-finite scores; and `raycurv evaluate --json` and the service's /summary agreeing on every
figure of one table."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from raycurv.cli import main
from raycurv.detection import (
    CO_SCORES,
    METRICS,
    SCORES,
    detection,
    evaluate_columns,
    evaluate_table,
    flagging_scores,
    targets,
)
from raycurv.serve.api import build_api
from raycurv.serve.prometheus import build_metrics
from raycurv.serve.registry import RunRegistry
from raycurv.serve.schemas import SummaryResponse
from raycurv.serve.settings import build_settings
from raycurv.table import build_table, read_metadata
from tests.serve_support import make_table, write_run

NAN_FIGURES = dict.fromkeys(METRICS, math.nan)


def _same(a: dict, b: dict) -> bool:
    """Equal figure by figure, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_hand_computed_figures_with_ties():
    # positives score 3 and 2; the others 1, 2 (tied with a positive) and 0
    scores = np.array([3.0, 1.0, 2.0, 2.0, 0.0])
    positives = np.array([True, False, False, True, False])
    found = detection(scores, positives)
    # AUROC: 3 beats all three others; 2 beats 1 and 0 and ties 2 (half): (3 + 2.5) / 6
    # AP: threshold 3 -> precision 1, recall 1/2; threshold 2 -> precision 2/3, recall 1
    # P@2: 3, then the tie at 2 in row order: row 2 (not a positive) before row 3
    assert found == {"positives": 2, "auroc": pytest.approx(5.5 / 6),
                     "average_precision": pytest.approx(0.5 * 1 + 0.5 * 2 / 3), "precision_at_k": 0.5}
    assert detection(scores[[0, 3, 2, 1, 4]], positives[[0, 3, 2, 1, 4]])["precision_at_k"] == 1.0


def test_all_scores_tied_is_chance():
    found = detection(np.ones(8), np.arange(8) < 2)
    assert found == {"positives": 2, "auroc": 0.5, "average_precision": 0.25, "precision_at_k": 1.0}


@pytest.mark.parametrize("positives", [np.zeros(4, dtype=bool), np.ones(4, dtype=bool)])
def test_a_single_class_is_nan(positives):
    assert _same(detection(np.arange(4.0), positives), {"positives": int(positives.sum()), **NAN_FIGURES})


def test_non_finite_scores_rank_nan_lowest_and_inf_highest():
    scores = np.array([np.inf, 5.0, np.nan, -np.inf, 1.0], dtype=np.float32)
    # positives +inf and 1.0; others 5, NaN, -inf: +inf beats all, 1.0 beats NaN and -inf (tied)
    found = detection(scores, np.array([True, False, False, False, True]))
    assert found["auroc"] == pytest.approx(5 / 6) and found["precision_at_k"] == 0.5


def test_among_restricts_the_comparison_and_bad_shapes_are_refused():
    scores = np.array([9.0, 3.0, 1.0, 2.0])
    positives = np.array([False, True, False, False])
    assert detection(scores, positives)["auroc"] == pytest.approx(2 / 3)
    assert detection(scores, positives, among=np.array([False, True, True, True]))["auroc"] == 1.0
    with pytest.raises(ValueError, match="same length"):
        detection(scores, positives[:3])
    with pytest.raises(ValueError, match="shape of scores"):
        detection(scores, positives, among=np.ones(3, dtype=bool))


def test_targets_duplicates_against_clean_samples_only():
    # row 0: a corrupted label with the highest score; rows 1 and 5: injected duplicates
    corrupted = np.array([True, False, False, False, False, False])
    duplicate_of = np.array([-1, 0, -1, -1, -1, 2])
    curvature = np.array([10.0, 5.0, 1.0, 2.0, 3.0, 4.0])
    found = targets(corrupted, duplicate_of)
    assert found["corrupted"][0].tolist() == corrupted.tolist() and found["corrupted"][1].all()
    assert found["duplicate"][0].tolist() == [False, True, False, False, False, True]
    assert found["duplicate"][1].tolist() == [False, True, True, True, True, True]
    metrics = evaluate_columns({"corrupted": corrupted, "duplicate_of": duplicate_of, "curvature": curvature})
    assert metrics["samples"] == 6 and metrics["corrupted"] == 1 and metrics["duplicates"] == 2
    # duplicates 5 and 4 above the clean 1, 2, 3; the corrupted 10 is no negative here
    assert metrics["detection"]["duplicate"] == {"curvature": {
        "positives": 2, "auroc": 1.0, "average_precision": 1.0, "precision_at_k": 1.0}}
    # the corrupted label is told apart from every other sample, the duplicates included
    assert metrics["detection"]["corrupted"]["curvature"]["auroc"] == 1.0
    # duplicate_of as float with NaN for none; a table without a target leaves it out
    none = evaluate_columns({"corrupted": corrupted, "duplicate_of": np.full(6, np.nan), "csl": curvature})
    assert list(none["detection"]) == ["corrupted"] and list(none["detection"]["corrupted"]) == ["csl"]


def test_co_scores_are_read_in_their_direction():
    """aum and margin: lower = flagged first; learned_epoch: later first, never learned above
    every epoch; a sample without a training record (null aum) last; an all-null co-score out."""
    columns = {"curvature": np.array([1.0, 2.0, 3.0, 4.0]),
               "aum": np.array([-1.0, 2.0, 0.5, np.nan]),
               "margin": np.array([-0.1, 0.2, 0.05, np.nan]),
               "forgetting_events": np.array([2, 0, 1, -1]),
               "learned_epoch": np.array([-1, 0, 3, -1]),  # sample 0 never learned; 3 no record
               }
    flagged = flagging_scores(columns | {"final_loss": np.full(4, np.nan)})
    assert flagged["curvature"] is columns["curvature"] and np.isnan(flagged["final_loss"]).all()
    np.testing.assert_array_equal(flagged["aum"], [1.0, -2.0, -0.5, np.nan])
    np.testing.assert_array_equal(flagged["forgetting_events"], [2, 0, 1, np.nan])
    np.testing.assert_array_equal(flagged["learned_epoch"], [np.inf, 0, 3, np.nan])
    positives = np.array([True, False, False, False])
    found = evaluate_columns({"corrupted": positives, "duplicate_of": np.full(4, -1), **columns})
    for score in CO_SCORES:  # sample 0 is flagged first by every co-score
        assert found["detection"]["corrupted"][score]["auroc"] == 1.0, score
    assert found["detection"]["corrupted"]["curvature"]["auroc"] == 0.0
    unrecorded = {name: np.full(4, np.nan) for name in CO_SCORES}
    assert list(flagging_scores(unrecorded | {"csl": np.ones(4)})) == ["csl"]
    with pytest.raises(ValueError, match="same length"):
        flagging_scores({"aum": np.ones(4), "csl": np.ones(3)})


def _table(n: int, *, noise: float, seed: int) -> pa.Table:
    """make_table's table (noise, 10 % duplicates, some of them corrupted) with tied curvature,
    non-finite csl values and co-scores (some samples never learned, one without a record)."""
    base = make_table(n, seed=seed, noise=noise, run="agree")
    columns = {name: base.column(name).to_numpy(zero_copy_only=False)
               for name in base.column_names if name not in ("rank", "percentile")}
    columns["duplicate_of"] = base.column("duplicate_of").fill_null(-1).to_numpy()
    columns["curvature"] = np.round(columns["curvature"], 1)
    columns["csl"] = columns["csl"].copy()
    columns["csl"][[3, 17]], columns["csl"][5] = np.nan, np.inf
    rng = np.random.default_rng(seed)
    columns["aum"] = (rng.normal(size=n) - columns["corrupted"]).astype(np.float32)
    columns["aum"][7] = np.nan
    columns["margin"] = np.tanh(columns["aum"])
    columns["forgetting_events"] = rng.poisson(columns["corrupted"] + 0.5)
    columns["learned_epoch"] = np.where(rng.random(n) < 0.2, -1, rng.integers(0, 6, n))
    columns["forgetting_events"][7] = columns["learned_epoch"][7] = -1
    return build_table(columns, read_metadata(base))


@pytest.mark.parametrize("noise", [0.2, 1.0])  # 1.0: every label corrupted, no clean sample
def test_evaluate_and_the_service_summary_agree(tmp_path, capsys, noise):
    table = _table(300, noise=noise, seed=11)
    write_run(tmp_path, "agree", table)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "agree"), "--json", "--no-duplicates"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert _same_metrics(evaluated, evaluate_table(table))

    response = asyncio.run(_service_get(tmp_path, "/v1/runs/agree/summary"))
    assert response.status_code == 200
    body = response.json()
    SummaryResponse.model_validate(body)

    assert (body["rows"], body["corrupted"], body["duplicates"]) == (
        evaluated["samples"], evaluated["corrupted"], evaluated["duplicates"])
    served = {(d.pop("target"), d.pop("score")): d for d in body["detection"]}
    expected = {(target, score): figures for target, by_score in evaluated["detection"].items()
                for score, figures in by_score.items()}
    assert list(served) == list(expected)
    assert {score for _, score in served} == set(SCORES)
    for key, figures in expected.items():
        as_json = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in figures.items()}
        assert served[key] == as_json, key

    corrupted = table.column("corrupted").to_numpy(zero_copy_only=False)
    curvature = table.column("curvature").to_numpy()
    is_dup = table.column("duplicate_of").is_valid().to_numpy(zero_copy_only=False)
    if noise == 1.0:  # a single class: null figures; no clean sample: no duplicate target
        assert list(served) == [("corrupted", s) for s in SCORES]
        assert served["corrupted", "curvature"] == {"positives": 300, **dict.fromkeys(METRICS)}
        return
    assert served["corrupted", "curvature"]["auroc"] == pytest.approx(roc_auc_score(corrupted, curvature))
    clean = ~corrupted
    assert is_dup[corrupted].any()  # corrupted copies exist, and are left out of the comparison
    assert served["duplicate", "curvature"]["positives"] == int(is_dup[clean].sum())
    assert served["duplicate", "curvature"]["auroc"] == pytest.approx(
        roc_auc_score(is_dup[clean], curvature[clean]))
    assert served["corrupted", "csl"]["auroc"] is not None  # NaN and inf scores are ranked
    aum = table.column("aum").to_numpy(zero_copy_only=False)
    recorded_lowest = np.where(np.isnan(aum), np.nanmin(-aum) - 1, -aum)  # no record: last
    assert served["corrupted", "aum"]["auroc"] == pytest.approx(
        roc_auc_score(corrupted, recorded_lowest))


async def _service_get(runs, path: str) -> httpx.Response:
    """GET ``path`` from the lookup API over the run folders in ``runs`` (its FastAPI app in
    process: no Ray)."""
    metrics = build_metrics()
    registry = RunRegistry(sources=[runs], metrics=metrics)
    registry.refresh()
    settings = build_settings(runs=[runs], reload_interval_s=60.0, token=None, environ={})
    app = build_api(registry=registry, settings=settings, metrics=metrics, reload=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://raycurv") as client:
        return await client.get(path)


def _same_metrics(a: dict, b: dict) -> bool:
    if a.keys() != b.keys() or a["detection"].keys() != b["detection"].keys():
        return False
    return all(_same(a["detection"][t][s], b["detection"][t][s])
               for t in a["detection"] for s in a["detection"][t]) and all(
        a[k] == b[k] for k in a if k != "detection")
