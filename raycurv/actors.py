"""Curvature actors: each owns a contiguous shard of sample positions and scores it on every
epoch's model while training goes on. Per-epoch values are kept, so scoring an epoch twice counts
it once, and each epoch's are written once, when it is recorded (one file per shard and epoch,
never rewritten), so a restarted actor resumes where it was. At the end each actor reduces its
shard to per-sample columns; the driver joins those (N rows), never an N x epochs array.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
import torch

from raycurv import storage
from raycurv.cluster import outside_placement_groups
from raycurv.config import ScoreSpec
from raycurv.curvature import curvature, reduce_probe_norms
from raycurv.data import Normalization, Prepared
from raycurv.data.plane import StoreImages
from raycurv.data.sharding import actor_shards, scoring_batches
from raycurv.data.transforms import to_input
from raycurv.dynamics import CO_SCORES, TRAINING_RECORDS, co_scores
from raycurv.metrics import record_scoring
from raycurv.model_instance import ModelInstance
from raycurv.models import ModelChoice, build_model
from raycurv.runfolder import RunFolder, legacy_shard_state, shard_epoch_file, shard_epoch_files
from raycurv.scoring_model import ScoringModel, prepare_for_scoring


@dataclass(frozen=True)
class ShardSpec:
    """What a scorer needs besides its images: shapes, normalization and the estimator."""

    index: int
    start: int  # first position (inclusive) in the prepared dataset
    stop: int  # last position (exclusive)
    epochs: int
    model: ModelChoice  # a name, or a packed nn.Module instance (raycurv.models)
    in_channels: int
    num_classes: int
    norm: Normalization
    seed: int
    estimators: tuple[tuple[float, int, str], ...]  # (h, probes, variant); the first is primary
    batch_size: int
    state_uri: str  # this shard's state folder (local path or pyarrow URI; RunFolder.shard_state)
    method: str = "fd"  # raycurv.curvature.METHODS
    precision: str | None = None  # None (fp32) or a raycurv.curvature.HALF_PRECISIONS key
    optimize: bool = True  # batch norm folded, channels last (raycurv.scoring_model)
    compile: bool = False


class ShardScorer:
    """Scores one shard (plain Python: the actor below wraps it; tests use it directly).

    State: per-epoch curvature (estimators, epochs, n) and training records (raycurv.dynamics.
    TRAINING_RECORDS: loss, logit margin, probability margin; each (epochs, n)), float32, NaN where
    not yet recorded, and the loss, prediction and confidence of the latest scored epoch's model.
    Estimators sharing an h share their gradient passes: the variants and smaller probe counts
    follow from the per-probe norms of the largest.
    """

    def __init__(self, spec: ShardSpec, images: np.ndarray, labels: np.ndarray,
                 sample_ids: np.ndarray, *, device: str = "cpu"):
        self.spec, self.device = spec, torch.device(device)
        self.images, self.labels, self.sample_ids = images, labels, sample_ids
        n = spec.stop - spec.start
        self.curvature = np.full((len(spec.estimators), spec.epochs, n), np.nan, dtype=np.float32)
        self.training = {name: np.full((spec.epochs, n), np.nan, dtype=np.float32)
                         for name in TRAINING_RECORDS}
        self.final = {"epoch": -1, "loss": np.full(n, np.nan, np.float32),
                      "pred": np.full(n, -1, np.int32), "confidence": np.full(n, np.nan, np.float32)}
        self.model = build_model(spec.model, in_channels=spec.in_channels,
                                 num_classes=spec.num_classes).to(self.device)
        self._load()

    @property
    def train_loss(self) -> np.ndarray:
        """Per-epoch training loss of the shard's samples (epochs, n), NaN where not recorded."""
        return self.training["train_loss"]

    @property
    def scored_epochs(self) -> list[int]:
        return [int(e) for e in np.flatnonzero(~np.isnan(self.curvature).any(axis=(0, 2)))]

    def score_epoch(self, epoch: int, weights: dict[str, torch.Tensor] | None,
                    training: dict[str, np.ndarray]) -> dict[str, Any]:
        """Score the shard on ``weights`` (the model after ``epoch``); record this shard's slice of
        ``training``, the epoch's per-sample training records by name (TRAINING_RECORDS, each
        (N,); ``train_loss`` required, a missing margin stays NaN). Idempotent per epoch.
        ``weights`` None: an epoch the run does not score; only its training records are kept."""
        if "train_loss" not in training:
            raise ValueError(f"training records {sorted(training)} lack train_loss")
        started = time.perf_counter()
        skipped = {"shard": self.spec.index, "epoch": epoch, "samples": 0, "seconds": 0.0}
        if weights is None:
            self._keep_training(epoch, training)
            self._save(epoch)
            return skipped
        if epoch in self.scored_epochs:
            return skipped
        self.model.load_state_dict(weights)
        s, scoring = self.spec, None
        for a, b in scoring_batches(s.start, s.stop, s.batch_size):
            lo, hi = a - s.start, b - s.start
            x = to_input(self.images[lo:hi], s.norm, device=self.device)
            if scoring is None:  # once per epoch's weights
                scoring = prepare_for_scoring(self.model, x, fold_batch_norm=s.optimize,
                                              channels_last=s.optimize, compile=s.compile)
            y = torch.tensor(self.labels[lo:hi], device=self.device)  # copies: read-only arrays
            ids = torch.tensor(self.sample_ids[lo:hi], device=self.device)
            out = self._score_batch(scoring, x, y, ids, epoch, lo, hi)
            if epoch >= self.final["epoch"]:
                self.final["loss"][lo:hi] = out.loss.cpu().numpy()
                self.final["pred"][lo:hi] = out.pred.cpu().numpy()
                self.final["confidence"][lo:hi] = out.confidence.cpu().numpy()
        self.final["epoch"] = max(self.final["epoch"], epoch)
        self._keep_training(epoch, training)
        self._save(epoch)
        return {"shard": s.index, "epoch": epoch, "samples": s.stop - s.start,
                "seconds": time.perf_counter() - started}

    def _keep_training(self, epoch: int, training: dict[str, np.ndarray]) -> None:
        for name in TRAINING_RECORDS:
            if name in training:
                self.training[name][epoch] = training[name][self.spec.start:self.spec.stop]

    def _score_batch(self, scoring: ScoringModel, x, y, ids, epoch: int, lo: int, hi: int):
        """Every estimator on one batch; one set of gradient passes per distinct h."""
        s, out = self.spec, None
        for h in dict.fromkeys(est[0] for est in s.estimators):
            probes = max(n for eh, n, _ in s.estimators if eh == h)
            out = curvature(scoring.module, x, y, sample_ids=ids, epoch=epoch, seed=s.seed, h=h,
                            probes=probes, variant="norm", method=s.method, precision=s.precision,
                            max_pass=scoring.max_pass)
            for k, (eh, n, variant) in enumerate(s.estimators):
                if eh == h:
                    values = reduce_probe_norms(out.probe_norms[:n], h=h, variant=variant)
                    self.curvature[k, epoch, lo:hi] = values.cpu().numpy()
        return out

    def summary(self) -> dict[str, Any]:
        """The shard reduced to what the score tables need, per sample (positions start +
        arange(n)): ``curvature`` (estimators, n) float32, the mean over scored epochs (higher =
        more memorized), and ``epochs_scored`` (estimators, n); ``csl`` (the summed training loss),
        the co-scores of raycurv.dynamics and the final model's columns, each (n,); ``scored``
        (estimators, epochs) bool, the epochs each estimator scored in this shard."""
        scored = ~np.isnan(self.curvature)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a sample never scored: checked on merge
            mean = np.stack([np.nanmean(c, axis=0) for c in self.curvature])
        return {"start": self.spec.start, "stop": self.spec.stop, "state_uri": self.spec.state_uri,
                "curvature": mean, "epochs_scored": scored.sum(axis=1), "scored": scored.any(axis=2),
                "csl": np.nansum(self.training["train_loss"], axis=0),
                **co_scores(self.training["train_margin"], self.training["train_prob_margin"]),
                "final_loss": self.final["loss"], "final_pred": self.final["pred"],
                "final_confidence": self.final["confidence"]}

    # --- persistence: one file per recorded epoch ---------------------------------------

    def _epoch_record(self, epoch: int) -> dict[str, np.ndarray]:
        """What ``epoch`` added: curvature (estimators, n), the training records (n,) each, and
        the final model's columns when it is the latest scored epoch."""
        record = {"curvature": self.curvature[:, epoch],
                  **{name: self.training[name][epoch] for name in TRAINING_RECORDS}}
        if self.final["epoch"] == epoch:
            record |= {"final_loss": self.final["loss"], "final_pred": self.final["pred"],
                       "final_confidence": self.final["confidence"]}
        return record

    def _save(self, epoch: int) -> None:
        storage.write_npz(shard_epoch_file(self.spec.state_uri, epoch), self._epoch_record(epoch))

    def _load(self) -> None:
        files = shard_epoch_files(self.spec.state_uri)
        if not files:
            self._split_legacy_state()
            return
        for epoch, location in files.items():
            saved = storage.read_npz(location)
            if (epoch < self.spec.epochs and saved is not None
                    and saved["curvature"].shape == self.curvature[:, epoch].shape):
                self._restore(epoch, saved)

    def _restore(self, epoch: int, saved: dict[str, np.ndarray]) -> None:
        self.curvature[:, epoch] = saved["curvature"]
        # a record written before raycurv kept margins has train_loss only: the rest stay NaN
        for name in TRAINING_RECORDS:
            if name in saved:
                self.training[name][epoch] = saved[name]
        if "final_loss" in saved and epoch > self.final["epoch"]:
            self.final = {"epoch": epoch, "loss": saved["final_loss"], "pred": saved["final_pred"],
                          "confidence": saved["final_confidence"]}

    def _split_legacy_state(self) -> None:
        """A state kept whole in one file (earlier versions): loaded, and written out per epoch."""
        saved = storage.read_npz(legacy_shard_state(self.spec.state_uri))
        if saved is None or saved["curvature"].shape != self.curvature.shape:
            return
        self.curvature = saved["curvature"]
        self.training.update({name: saved[name] for name in TRAINING_RECORDS if name in saved})
        self.final = {"epoch": int(saved["final_epoch"]), "loss": saved["final_loss"],
                      "pred": saved["final_pred"], "confidence": saved["final_confidence"]}
        recorded = ~np.isnan(self.curvature).all(axis=(0, 2)) | ~np.isnan(self.train_loss).all(axis=1)
        for epoch in np.flatnonzero(recorded):
            self._save(int(epoch))


@ray.remote(max_restarts=-1, max_task_retries=-1)
class CurvatureActor:
    """A ShardScorer in its own process; restarts reload the shard's state from storage.

    The shard's data comes with every call, as ``[ref]`` (a nested ref, fetched on first use
    only), not as a constructor argument: Ray cannot keep a restartable actor's constructor
    arguments alive (ray-project/ray#53727), while a retried call brings its ref along. A model
    instance travels the same way: the shard's data holds a ref to it (put once for all shards),
    and the spec the constructor gets names it only."""

    def __init__(self, spec: ShardSpec, run: str):
        self.spec, self.run, self.scorer = spec, run, None

    def _scorer(self, shard: list[ray.ObjectRef]) -> ShardScorer:
        """``shard``: [ref] to the shard's arrays (images, labels, sample_ids), or to ``store``, a
        prepared dataset (raycurv.data.plane.Store) whose rows of this shard are streamed."""
        if self.scorer is None:
            spec, data = self.spec, ray.get(shard[0])
            if "model" in data:  # a packed nn.Module instance, put in the object store once
                spec = replace(spec, model=ray.get(data["model"]))
            if "store" in data:
                store = data["store"]
                ids = store.read_rows(spec.start, spec.stop, columns=("sample_id", "label"))
                data = {"images": StoreImages(store, spec.start, spec.stop), "labels": ids["label"],
                        "sample_ids": ids["sample_id"]}
            device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
            self.scorer = ShardScorer(spec, data["images"], data["labels"], data["sample_ids"],
                                      device=device)
        return self.scorer

    def score_epoch(self, shard: list[ray.ObjectRef], epoch: int, weights: dict,
                    training: dict[str, np.ndarray]) -> dict[str, Any]:
        stats = self._scorer(shard).score_epoch(epoch, weights, training)
        record_scoring(self.run, stats["shard"], stats["samples"], stats["seconds"])
        return stats

    def scored_epochs(self, shard: list[ray.ObjectRef]) -> list[int]:
        return self._scorer(shard).scored_epochs

    def summary(self, shard: list[ray.ObjectRef]) -> dict[str, Any]:
        return self._scorer(shard).summary()

    def pid(self) -> int:
        return os.getpid()


@dataclass
class CurvaturePool:
    """Handles to the shard actors; picklable, so training workers can feed them."""

    actors: list[Any]
    max_lag: int
    # the shards' object refs, one per actor: each call hands the actor [its ref]
    shard_refs: list[Any] = field(default_factory=list)

    def submit(self, epoch: int, weights: dict[str, torch.Tensor] | None,
               training: dict[str, np.ndarray]) -> list[ray.ObjectRef]:
        """Hand epoch ``epoch``'s weights (put in the object store once for all actors; None for an
        epoch that is not scored) and training records (name -> (N,), see
        ShardScorer.score_epoch) to every actor; no waiting."""
        weights_ref = None if weights is None else ray.put(weights)
        training_ref = ray.put(training)
        return [actor.score_epoch.remote([shard], epoch, weights_ref, training_ref)
                for actor, shard in zip(self.actors, self.shard_refs, strict=True)]

    def summaries(self) -> list[dict[str, Any]]:
        return ray.get([actor.summary.remote([shard])
                        for actor, shard in zip(self.actors, self.shard_refs, strict=True)])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


# --- the pool of a scoring run ------------------------------------------------------------------

def shard_specs(spec: ScoreSpec, data: Prepared) -> list[ShardSpec]:
    """What each curvature actor is told: its shard of positions, the model, the estimators."""
    c = spec.curvature
    folder = RunFolder(spec.run_dir)
    return [ShardSpec(
        index=index, start=start, stop=stop, epochs=spec.train.epochs, model=spec.train.model,
        in_channels=data.input_shape[0], num_classes=data.num_classes, norm=data.norm,
        seed=spec.seed, estimators=tuple((e.h, e.probes, e.variant) for e in c.estimators),
        batch_size=c.batch_size, method=c.method,
        precision=None if c.precision == "fp32" else c.precision, optimize=c.optimize,
        compile=c.compile, state_uri=folder.shard_state(index))
        for index, (start, stop) in enumerate(actor_shards(len(data), c.actors, c.batch_size))]


def start_pool(spec: ScoreSpec, data: Prepared) -> CurvaturePool:
    """Create the curvature actors, each with only its shard's images in the object store, and a
    model instance there once for all of them (CurvatureActor says why not in their specs)."""
    outside = outside_placement_groups()
    c = spec.curvature
    instance = spec.train.model if isinstance(spec.train.model, ModelInstance) else None
    model = {} if instance is None else {"model": ray.put(instance)}
    actors, refs = [], []
    for shard_spec in shard_specs(spec, data):
        start, stop = shard_spec.start, shard_spec.stop
        shard = ray.put({**model, **({"store": data.store} if data.images is None else
                        {"images": data.images[start:stop], "labels": data.labels[start:stop],
                         "sample_ids": data.sample_ids[start:stop]})})
        refs.append(shard)
        named = shard_spec if instance is None else replace(shard_spec, model=str(instance))
        actors.append(CurvatureActor.options(num_cpus=c.actor_cpus, num_gpus=c.actor_gpus,
                                             scheduling_strategy=outside)
                      .remote(named, spec.run_name))
    return CurvaturePool(actors=actors, max_lag=c.max_lag, shard_refs=refs)


@dataclass
class Merged:
    """The shards' summaries (ShardScorer.summary) joined in dataset order."""

    columns: dict[str, np.ndarray]  # (N,) each: the columns every estimator's table shares
    curvature: np.ndarray  # (estimators, N) mean over scored epochs
    epochs_scored: np.ndarray  # (estimators, N)
    scored: np.ndarray  # (estimators, epochs) bool: the epochs each estimator scored
    shards: list[tuple[int, int, str]]  # (start, stop, state folder), in position order


def merge_summaries(summaries: list[dict[str, Any]], data: Prepared) -> Merged:
    """Per-shard summaries -> per-sample columns in dataset order (csl, the final model's
    columns, the co-scores of raycurv.dynamics) and each estimator's curvature. Raises
    RuntimeError when a sample was never scored."""
    ordered = sorted(summaries, key=lambda s: s["start"])
    epochs_scored = np.concatenate([s["epochs_scored"] for s in ordered], axis=1)
    if not (epochs_scored > 0).all():
        raise RuntimeError(f"{int((epochs_scored == 0).sum())} (estimator, sample) pairs were never scored")
    per_sample = ("csl", *CO_SCORES, "final_loss", "final_confidence", "final_pred")
    columns = {
        "sample_id": data.sample_ids, "label": data.labels, "original_label": data.original_labels,
        "corrupted": data.corrupted, "duplicate_of": data.duplicate_of,
        **{name: np.concatenate([s[name] for s in ordered]) for name in per_sample}}
    return Merged(columns=columns,
                  curvature=np.concatenate([s["curvature"] for s in ordered], axis=1),
                  epochs_scored=epochs_scored,
                  scored=np.logical_or.reduce([s["scored"] for s in ordered]),
                  shards=[(s["start"], s["stop"], s["state_uri"]) for s in ordered])
