"""The Python API: raycurv.score / load_run / evaluate / lookup, and the README's example run as
written (extracted from the README), with a torchvision model instance and a factory string."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

import raycurv
from raycurv.api import build_spec, model_option

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The Python block of the README's "Python API" section."""
    section = re.search(r"## Python API\n(.*?)\n## ", (ROOT / "README.md").read_text(), re.S)
    return re.search(r"```python\n(.*?)```", section.group(1), re.S).group(1)


def test_the_api_is_listed():
    assert {"score", "load_run", "evaluate", "lookup", "Run", "UsageError"} <= set(raycurv.__all__)
    for name in raycurv.__all__:
        assert getattr(raycurv, name) is not None
    with pytest.raises(AttributeError):
        raycurv.no_such_function  # noqa: B018


def test_options_become_a_spec():
    spec = build_spec({"seed": 3, "data": {"limit": 50}}, noise=0.2, epochs=2, h=0.01,
                      curvature={"batch_size": 32}, model=model_option)
    assert (spec.seed, spec.data.limit, spec.data.noise) == (3, 50, 0.2)
    assert (spec.train.epochs, spec.curvature.h, spec.curvature.batch_size) == (2, 0.01, 32)
    assert spec.train.model == "raycurv.api:model_option"


@pytest.mark.parametrize(("call", "message"), [
    (lambda: raycurv.score(nosie=0.1), "unknown option 'nosie'; valid: "),
    (lambda: raycurv.score(batch_size=8), "batch_size is a field of train and curvature"),
    (lambda: raycurv.score(noise=1.5), "data.noise: Input should be less than 1"),
    (lambda: raycurv.score(spec=[1]), "spec must be a ScoreSpec or a dict"),
    (lambda: raycurv.score(model=lambda c, k: None), "define it in an importable module"),
    (lambda: raycurv.score(model=3), "model must be a name"),
    (lambda: raycurv.load_run(""), "location must be a path or a URI"),
    (lambda: raycurv.lookup("x"), "give either sample_id or top"),
    (lambda: raycurv.lookup("x", top=0), "top must be an integer >= 1, got 0"),
    (lambda: raycurv.lookup("x", sample_id=1, label=2), "label needs top"),
    (lambda: raycurv.lookup("x", top=1, order="up"), "order must be 'desc' or 'asc'"),
    (lambda: raycurv.evaluate("x", top_k=-1), "top_k must be a positive number"),
])
def test_bad_arguments_raise_one_usage_error(call, message):
    with pytest.raises(raycurv.UsageError, match=re.escape(message)) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_model_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(raycurv.UsageError, match="outputs \\(2, 3\\)"):
        raycurv.score(limit=100, model="tests.byo_models:wrong_outputs", run_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_load_run_of_a_missing_folder(tmp_path):
    with pytest.raises(raycurv.UsageError, match="no score table at"):
        raycurv.load_run(tmp_path)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example's relative run_dir lands here
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    run, small = namespace["run"], namespace["small"]  # a torchvision instance, a factory string
    instance = "instance of torchvision.models.resnet.ResNet"
    assert isinstance(run, raycurv.Run) and run.location == str(tmp_path / "runs" / "api-demo")
    assert run.table.num_rows == 300 and run.metadata["model"] == instance
    assert small.location == str(tmp_path / "runs" / "api-small")
    assert small.table.num_rows == 300 and small.metadata["model"] == "raycurv.models:SmallCNN"
    assert small.table.column("sample_id").equals(run.table.column("sample_id"))
    assert namespace["metrics"]["detection"]["corrupted"]
    top = namespace["top"]["rows"]
    assert [r["rank"] for r in top] == [1, 2, 3]
    assert top[0]["curvature"] == pytest.approx(float(run.table.column("curvature").to_numpy().max()))
    out = capsys.readouterr().out
    assert "mislabel AUROC" in out and f"{instance} | raycurv.models:SmallCNN" in out
    issues = pd.read_csv(namespace["issues"], index_col="sample_id")
    assert len(issues) == 300 and issues["is_label_issue"].dtype == bool
