"""raycurv from Python: score a dataset, load a stored run, evaluate it, look samples up.

Every function checks its inputs first and raises :class:`raycurv.errors.UsageError` (a
ValueError) with a one-line message for anything the caller can fix; the work is done by the same
library code as the command line's. Scores: ``curvature`` is the mean per-epoch input-loss
curvature (norm of gradient differences, in units of the normalized input's loss gradient);
**higher = more memorized**; ``rank`` 1 is the highest curvature; ``percentile`` is the share of
samples with lower curvature, in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ValidationError

from raycurv import storage
from raycurv.config import ScoreSpec, merge
from raycurv.detection import evaluate_table
from raycurv.errors import UsageError, validation_line
from raycurv.evaluate import evaluate_run, load_run_table
from raycurv.export import DEFAULT_THRESHOLD, FORMATS, write_export
from raycurv.model_instance import ModelInstance
from raycurv.runfolder import RunFolder
from raycurv.serve import client
from raycurv.table import read_metadata

# Spec sections whose fields score() takes as plain keywords (top-level fields come first).
_SECTIONS = ("data", "train", "curvature")


@dataclass
class Run:
    """A scored run: its score table (contract 1.x), detection metrics and folder.

    Attributes
    ----------
    location : str
        The run folder: a local path or a pyarrow URI (``file://``, ``s3://``, ``gs://``).
    table : pyarrow.Table
        One row per training sample, sorted by ``sample_id`` (columns: README, "The score table").
        ``curvature``: higher = more memorized; ``aum``, ``margin``: lower = more likely mislabeled.
    metrics : dict
        Detection metrics (AUROC, average precision, precision@k in [0, 1], higher = better) of
        each score for the injected label noise and duplicates; empty targets where none were injected.
    train : dict
        The last epoch's training metrics (only for a run scored in this process).
    seconds : float or None
        Wall time of the scoring run, in seconds (only for a run scored in this process).
    """

    location: str
    table: pa.Table
    metrics: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    @property
    def folder(self) -> RunFolder:
        """The run folder (raycurv.runfolder.RunFolder): every file of the run."""
        return RunFolder(self.location)

    @property
    def metadata(self) -> dict[str, Any]:
        """The table's metadata: dataset, model, estimator (h, probes, variant), epochs, seed."""
        return read_metadata(self.table)

    def to_pandas(self):
        """The score table as a pandas DataFrame (one row per sample, sorted by sample_id)."""
        return self.table.to_pandas()

    def top(self, k: int = 10):
        """The ``k`` most memorized samples (highest curvature, rank 1 first) as a DataFrame."""
        _check_int("k", k, minimum=1)
        return self.table.sort_by([("rank", "ascending")]).slice(0, k).to_pandas()


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_location(name: str, value: Any) -> str:
    if not isinstance(value, str | Path) or not str(value).strip():
        raise UsageError(f"{name} must be a path or a URI, got {value!r}")
    return str(value)


def model_option(model: Any) -> str | ModelInstance:
    """A model as the spec holds it: a registered name or ``package.module:factory`` as given; a
    factory callable by its import path, which every training worker and actor imports (a factory
    defined in a notebook or script is not importable there: put it in a module); an
    ``nn.Module`` instance packed, to travel by value (raycurv.models.pack_instance). Raises
    UsageError (one line)."""
    if isinstance(model, str | ModelInstance):
        return model
    from torch import nn  # a model that is no name: torch is loaded to tell a module from a factory

    from raycurv.models import pack_instance

    if isinstance(model, nn.Module):
        try:
            return pack_instance(model)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not callable(model):
        raise UsageError(f"model must be a name, 'package.module:factory', a factory callable or "
                         f"an nn.Module instance, got {type(model).__name__}")
    module, qualname = getattr(model, "__module__", None), getattr(model, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise UsageError(f"model factory {qualname or model!r} is defined in {module or 'no module'}: "
                         "define it in an importable module, so that Ray's workers can import it, "
                         "or pass an nn.Module instance")
    return f"{module}:{qualname}"


def _nested_options(options: dict[str, Any]) -> dict[str, Any]:
    """Keyword options -> a nested spec dict: a top-level field (seed, run_dir, name), a section
    as a dict (train={...}), or a section's field by its own name when only one section has it."""
    owners: dict[str, list[str]] = {}
    for section in _SECTIONS:
        annotation = ScoreSpec.model_fields[section].annotation
        for name in annotation.model_fields:
            owners.setdefault(name, []).append(section)
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in ScoreSpec.model_fields:
            value = value.model_dump() if isinstance(value, BaseModel) else value
            out[key] = merge(value, out[key]) if isinstance(out.get(key), dict) else value
        elif len(owners.get(key, ())) == 1:
            section = out.setdefault(owners[key][0], {})
            if isinstance(section, dict):
                section[key] = value
        elif key in owners:
            raise UsageError(f"{key} is a field of {' and '.join(owners[key])}: pass it as "
                             f"{owners[key][0]}={{{key!r}: ...}}")
        else:
            valid = sorted({*ScoreSpec.model_fields, *owners})
            raise UsageError(f"unknown option {key!r}; valid: {', '.join(valid)}")
    return out


def build_spec(spec: ScoreSpec | dict[str, Any] | None = None, **options: Any) -> ScoreSpec:
    """A validated ScoreSpec from ``spec`` (a ScoreSpec or its dict) with ``options`` on top.
    See :func:`score` for the options. Raises UsageError."""
    if spec is not None and not isinstance(spec, ScoreSpec | dict):
        raise UsageError(f"spec must be a ScoreSpec or a dict, got {type(spec).__name__}")
    base = spec.model_dump() if isinstance(spec, ScoreSpec) else dict(spec or {})
    merged = merge(base, _nested_options(options))
    train = merged.get("train")
    if isinstance(train, dict) and "model" in train:  # model=..., train={"model": ...} or spec's
        merged["train"] = {**train, "model": model_option(train["model"])}
    try:
        return ScoreSpec.model_validate(merged)
    except ValidationError as exc:
        raise UsageError(validation_line(exc)) from None


def score(spec: ScoreSpec | dict[str, Any] | None = None, *, address: str | None = None,
          verbose: bool = False, **options: Any) -> Run:
    """Train one network on Ray and score every training sample's memorization; or, with
    ``checkpoints``, score saved weights (one file per epoch) without training.

    Parameters
    ----------
    spec : ScoreSpec or dict, optional
        A whole run spec (the same as ``raycurv score --config``); ``options`` override it.
    address : str, optional
        An existing Ray cluster to join; default: the cluster this process already joined, else
        a local one started for the run.
    verbose : bool
        Also print Ray's and Ray Train's own INFO lines (default: one progress line per epoch).
    **options
        Spec fields by name, as the command line's flags: ``dataset``, ``data_root``, ``limit``,
        ``noise`` (share of labels flipped, in [0, 1)), ``duplicates``, ``model`` (a registered
        name, ``"package.module:factory"``, an importable factory callable
        ``(in_channels, num_classes) -> nn.Module``, or an ``nn.Module`` instance: its
        architecture, with its current parameters and buffers as the starting weights; a fresh
        copy of it goes to every training worker and actor, the instance itself is not changed,
        and the run record names it ``"instance of package.module.Class"``), ``weights`` (a
        state dict file to start from, loaded into the model), ``epochs``, ``lr``, ``h``
        (perturbation size, in normalized input units), ``probes``, ``variant``, ``actors``,
        ``workers``, ``seed``, ``run_dir`` (a path or a URI; default ``runs/digits``), ... A
        field two sections share goes in its section's dict: ``train={"batch_size": 128}``,
        ``curvature={"batch_size": 512}``.
        ``checkpoints``: a folder, glob or file of ``.pt``/``.pth`` state dicts, one per epoch
        in file-name order, scored with ``model`` (a name or an instance, which must match
        them) instead of training; the epochs are the checkpoints (``epochs`` does not apply).
        Epoch files with training records (``keep_weights=True`` runs,
        :class:`raycurv.Recorder`) give exact csl and co-scores; plain state dicts give none
        (csl 0, co-scores null, and the table's metadata ``"training_records": false``).
        ``keep_weights``: keep each epoch's weights in ``<run_dir>/epochs/`` (a placement
        setting: the scores do not change).

    Returns
    -------
    Run
        The score table (``curvature``: higher = more memorized), detection metrics, and the run
        folder, which holds the table as ``scores.parquet``.

    Raises
    ------
    UsageError
        Bad options, data, model, weights, checkpoints or run folder; raised before Ray starts
        and before anything is written.
    """
    from raycurv.run import score_run  # torch and Ray: only when scoring

    if "checkpoints" in options and "epochs" in options:
        raise UsageError("epochs does not apply with checkpoints: one epoch per checkpoint file")
    resolved = build_spec(spec, **options)
    result = score_run(resolved, address=address, verbose=bool(verbose))
    return Run(location=result.run_dir, table=result.table, metrics=result.metrics,
               train=result.train, seconds=result.seconds)


def load_run(location: str | Path) -> Run:
    """Load a stored run.

    Parameters
    ----------
    location : str or pathlib.Path
        A run folder or its ``scores.parquet``: a local path or a URI (``file://``, ``s3://``,
        ``gs://``).

    Returns
    -------
    Run
        The validated score table (a 1.0 table gets the 1.1 co-score columns, all null) and its
        detection metrics; ``curvature``: higher = more memorized.

    Raises
    ------
    UsageError
        No score table there, or a file that is not one.
    """
    folder, table = load_run_table(_check_location("location", location))
    return Run(location=folder.location, table=table, metrics=evaluate_table(table))


def evaluate(run: str | Path | Run, *, reference: str | None = None, top_k: float = 0.1,
             epochs: str | None = None, duplicates: bool = True,
             threshold: float | None = None) -> dict[str, Any]:
    """All metrics of a stored run, as ``raycurv evaluate --json`` prints them.

    Parameters
    ----------
    run : str, pathlib.Path or Run
        The run (folder or score table, local or a URI).
    reference : str, optional
        A Feldman-Zhang reference table (``raycurv reference``): agreement with it.
    top_k : float
        Agreement on the reference's top samples: a share if < 1 (default 0.1), else a count.
    epochs : str, optional
        ``"A:B"``: score by the mean curvature of epochs A..B-1 (0-based) instead of all.
    duplicates : bool
        Find exact and near duplicate images (needs the run's data).
    threshold : float, optional
        Aligned pixel distance below which two images are near duplicates, in [0, 2].

    Returns
    -------
    dict
        ``detection``: AUROC, average precision and precision@k (in [0, 1], higher = better) of
        each score for the corrupted labels and injected duplicates; ``duplicates`` and
        ``agreement`` where asked for.

    Raises
    ------
    UsageError
        Bad arguments, or no readable run there.
    """
    location = run.location if isinstance(run, Run) else _check_location("run", run)
    if isinstance(top_k, bool) or not isinstance(top_k, int | float) or top_k <= 0:
        raise UsageError(f"top_k must be a positive number, got {top_k!r}")
    if threshold is not None and not (isinstance(threshold, int | float) and 0 <= threshold <= 2):
        raise UsageError(f"threshold must lie in [0, 2], got {threshold!r}")
    if epochs is not None and not isinstance(epochs, str):
        raise UsageError(f"epochs must be a string 'A:B', got {epochs!r}")
    return evaluate_run(location, reference=reference, top_k=float(top_k), epochs=epochs,
                        duplicates=bool(duplicates), threshold=threshold)


def reads_table(run: str, *, url: str | None) -> bool:
    """Whether a lookup of ``run`` reads its table directly: no ``url`` given, and ``run`` is a URI
    or an existing path (else it names a run of the service)."""
    return url is None and (storage.is_uri(run) or Path(run).exists())


def lookup(run: str | Path | Run, sample_id: int | None = None, *, top: int | None = None,
           label: int | None = None, order: str = "desc", url: str | None = None,
           token: str | None = None) -> dict[str, Any]:
    """One sample, or the top ``top`` samples, of a run: from the lookup service or its table.

    Parameters
    ----------
    run : str, pathlib.Path or Run
        A run served at ``url``, or (without ``url``) a run folder or score table to read directly.
    sample_id : int, optional
        The sample to return; give either this or ``top``.
    top : int, optional
        The ``top`` most memorized samples (highest curvature, rank 1 first).
    label : int, optional
        With ``top``: only samples of this label.
    order : {"desc", "asc"}
        With ``top``: ``"desc"`` most memorized first, ``"asc"`` least.
    url : str, optional
        The service, e.g. ``http://127.0.0.1:8000``.
    token : str, optional
        The service's bearer token.

    Returns
    -------
    dict
        The API's JSON body: ``{"sample": row}`` or ``{"rows": [...], "total": n}``.

    Raises
    ------
    UsageError
        Bad arguments, an unknown run or sample, or a service that cannot be reached.
    """
    location = run.location if isinstance(run, Run) else _check_location("run", run)
    if (sample_id is None) == (top is None):
        raise UsageError("give either sample_id or top")
    if sample_id is not None:
        _check_int("sample_id", sample_id, minimum=0)
    if top is not None:
        _check_int("top", top, minimum=1)
    if label is not None:
        _check_int("label", label, minimum=0)
        if top is None:
            raise UsageError("label needs top")
    if order not in ("desc", "asc"):
        raise UsageError(f"order must be 'desc' or 'asc', got {order!r}")
    try:
        if reads_table(location, url=url):
            return (client.read_sample(location, sample_id=sample_id) if sample_id is not None
                    else client.read_top(location, k=top, label=label, order=order))
        url = url or client.DEFAULT_URL
        return (client.fetch_sample(url=url, run=location, sample_id=sample_id, token=token)
                if sample_id is not None else
                client.fetch_top(url=url, run=location, k=top, label=label, order=order, token=token))
    except client.QueryError as exc:
        raise UsageError(str(exc)) from None


def export(run: str | Path | Run, *, format: str, output: str | None = None,
           threshold: float = DEFAULT_THRESHOLD) -> str:
    """Write a run's scores in a layout another tool reads.

    Parameters
    ----------
    run : str, pathlib.Path or Run
        The run (folder or score table, local or a URI).
    format : {"csv", "jsonl", "cleanlab", "fiftyone"}
        ``csv``/``jsonl``: every column of the score table, plus ``path`` (the sample's source,
        where the run has one) and the class names of ``label`` and ``final_pred``;
        ``cleanlab``: cleanlab's label-issues table (``is_label_issue``, ``label_score``: lower =
        more likely an issue, ``given_label``, ``predicted_label``); ``fiftyone``: a
        FiftyOneImageClassificationDataset folder (README, "Exports").
    output : str, optional
        A file (a folder for ``fiftyone``), local or a URI; default ``<run>/exports/<name>``.
    threshold : float
        The percentile of the mislabel score (csl; the final loss without training records),
        in [0, 1], from which a sample whose final prediction is another class counts as a
        label issue (default 0.9: the top 10 %).

    Returns
    -------
    str
        Where the export was written.

    Raises
    ------
    UsageError
        An unknown format, a threshold outside [0, 1], no readable run, or an output that cannot
        be written.
    """
    location = run.location if isinstance(run, Run) else _check_location("run", run)
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
        raise UsageError(f"threshold must lie in [0, 1], got {threshold!r}")
    if output is not None:
        output = _check_location("output", output)
    folder, table = load_run_table(location)
    return write_export(folder, table, format=format, output=output, threshold=float(threshold))
