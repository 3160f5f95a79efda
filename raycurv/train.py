"""The per-worker training loop (Ray Train, DDP) and the TorchTrainer that runs it.

Each epoch every worker trains on its own share of a seeded permutation, records each sample's
training loss and margins (raycurv.dynamics.TRAINING_RECORDS; all-reduced, so csl and the
co-scores are exact for every sample), and rank 0 hands the epoch's weights and records to the
curvature pool without waiting for it, up to ``max_lag`` epochs in flight.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.data import ExecutionOptions
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from torch import nn
from torch.nn import functional as F

from raycurv import storage
from raycurv.config import ScoreSpec
from raycurv.data import Normalization, Prepared
from raycurv.data.plane import images_of
from raycurv.data.sharding import epoch_batches
from raycurv.data.transforms import augment, crop_padding, to_input
from raycurv.dynamics import TRAINING_RECORDS, training_margins
from raycurv.metrics import record_epoch
from raycurv.models import build_model
from raycurv.progress import Relay, Steps
from raycurv.runfolder import TRAIN_DIR, RunFolder


def _cosine(opt: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)


def _step(opt: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 3), gamma=0.1)


def _constant(opt: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, int], Any]] = {
    "cosine": _cosine, "step": _step, "constant": _constant,
}


def _load_checkpoint(model: nn.Module, opt, sched) -> int:
    """Restore the latest Ray Train checkpoint, if any; returns the first epoch still to train."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
    getattr(model, "module", model).load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1


def _all_reduce(array: np.ndarray) -> np.ndarray:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return array
    tensor = torch.as_tensor(array)
    torch.distributed.all_reduce(tensor)
    return tensor.numpy()


def _per_sample_mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Every worker's (records, N) sums and (N,) counts -> (records, N): each record's mean over
    the times the sample was trained this epoch (a streamed dataset padded to equal worker shares
    trains a few samples twice; everything else once, and its value is kept as it is)."""
    again = counts > 1
    sums[:, again] /= counts[again]
    return sums


def _maybe_fault(config: dict[str, Any], epoch: int, rank: int) -> None:
    """Test hook: kill this worker process once, at the start of ``fault_epoch`` on rank 0."""
    marker = config.get("fault_marker")
    if marker and rank == 0 and epoch == config.get("fault_epoch") and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


@dataclass(frozen=True)
class TrainData:
    """What the training loop needs of a prepared dataset; put in the object store once."""

    images: np.ndarray | None  # (N, C, H, W) raw; None: streamed from the "train" dataset
    labels: np.ndarray  # (N,) int64, the labels trained on
    sample_ids: np.ndarray  # (N,) increasing: a streamed batch's sample ids -> positions
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    norm: Normalization
    augment: bool  # random crop + flip in training (never in scoring)
    flip: bool  # whether a horizontal flip keeps the class

    @classmethod
    def of(cls, data: Prepared) -> TrainData:
        return cls(images=data.images, labels=data.labels, sample_ids=data.sample_ids,
                   shape=data.input_shape, num_classes=data.num_classes, norm=data.norm,
                   augment=data.augment, flip=data.flip)


SHUFFLE_BATCHES = 16  # a streamed dataset is shuffled within a buffer of this many batches


def epoch_data(data: TrainData, *, world: int, rank: int, batch_size: int, seed: int,
               epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This worker's training batches of one epoch: (positions (B,), raw images (B, C, H, W),
    labels (B,)). In memory: a seeded permutation dealt to the workers (raycurv.data.sharding).
    Streamed: this worker's split of Ray Train's "train" dataset (equal row counts per worker, as
    DDP needs), shuffled within a seeded buffer; the batches carry their sample ids, so every
    per-sample record lands on its sample whichever worker trained it."""
    if data.images is not None:
        for positions in epoch_batches(len(data.labels), world_size=world, rank=rank,
                                       batch_size=batch_size, seed=seed, epoch=epoch):
            yield positions, data.images[positions], data.labels[positions]
        return
    shard = ray.train.get_dataset_shard("train")
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                    local_shuffle_buffer_size=SHUFFLE_BATCHES * batch_size,
                                    local_shuffle_seed=seed * 1_000_003 + epoch * 1_009 + rank):
        yield (np.searchsorted(data.sample_ids, batch.column("sample_id").to_numpy()),
               images_of(batch.column("image"), data.shape), batch.column("label").to_numpy())


def _train_epoch(model, opt, data: TrainData, batches, *, device, generator, pad):
    """One pass over this worker's batches. Returns the per-position training records
    (len(TRAINING_RECORDS), N) float64 (loss, logit margin, probability margin), summed over the
    times this worker trained the sample (0 at positions other workers trained), that count (N,),
    and #correct."""
    records = np.zeros((len(TRAINING_RECORDS), len(data.labels)), dtype=np.float64)
    counts = np.zeros(len(data.labels), dtype=np.float64)
    correct = 0
    model.train()
    for positions, images, labels in batches:
        x = to_input(images, data.norm, device=device)
        if data.augment:
            x = augment(x, generator=generator, pad=pad, flip=data.flip)
        y = torch.as_tensor(np.require(labels, requirements="W"), device=device)  # Arrow's are read-only
        logits = model(x)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        opt.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        opt.step()
        values = torch.stack([per_sample.detach(), *training_margins(logits, y)]).cpu().numpy()
        np.add.at(records, (slice(None), positions), values)  # a position twice in a batch: both
        np.add.at(counts, positions, 1.0)
        correct += int((logits.argmax(1) == y).sum())
    return records, counts, correct


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. config: ``spec`` (ScoreSpec as a Python dump, in which a model
    instance stays one: raycurv.model_instance), ``data`` (a TrainData, or an object ref to one),
    ``pool`` (a CurvaturePool, or None to train only), ``verbose`` (False: this worker logs
    WARNING and above only)."""
    spec = ScoreSpec.model_validate(config["spec"])
    if not config.get("verbose", True):  # Ray Train's per-report INFO lines log to the root logger
        logging.getLogger().setLevel(logging.WARNING)
    data: TrainData = config["data"]
    data = ray.get(data) if isinstance(data, ray.ObjectRef) else data
    pool = config.get("pool")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(spec.seed)  # the same initial weights on every worker
    model = build_model(spec.train.model, in_channels=data.shape[0], num_classes=data.num_classes,
                        weights=spec.train.weights)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    t = spec.train
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                          weight_decay=t.weight_decay)
    sched = SCHEDULES[t.schedule](opt, t.epochs)
    start = _load_checkpoint(model, opt, sched)
    n = len(data.labels)
    folder = RunFolder(spec.run_dir)
    scores = functools.partial(spec.curvature.scores_epoch, epochs=t.epochs)  # epoch -> scored?
    pending = _catch_up(pool, folder, start, scores=scores) if pool is not None and rank == 0 else []
    pad = crop_padding(data.shape[1])
    progress = config.get("progress")  # a raycurv.progress.Relay's queue: the driver shows it
    if progress is not None and rank == 0:
        progress.put({"start": start})
    for epoch in range(start, t.epochs):
        _maybe_fault(config, epoch, rank)
        tic = time.perf_counter()
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch * 1_009 + rank)
        batches = epoch_data(data, world=world, rank=rank, batch_size=t.batch_size,
                             seed=spec.seed, epoch=epoch)
        records, counts, correct = _train_epoch(model, opt, data, batches, device=device,
                                                generator=generator, pad=pad)
        sched.step()
        records = _per_sample_mean(_all_reduce(records), _all_reduce(counts))
        losses = records[0]
        correct = int(_all_reduce(np.array([correct], dtype=np.int64))[0])
        train_seconds = time.perf_counter() - tic
        metrics = {"epoch": epoch, "train_loss": float(losses.mean()), "train_acc": correct / n,
                   "train_samples_per_s": n / train_seconds}
        checkpoint = None
        if rank == 0:
            model_state = getattr(model, "module", model).state_dict()
            if pool is not None:
                scored = scores(epoch)
                pending.append(_hand_to_pool(pool, folder, epoch,
                                             model_state if scored or t.keep_weights else None,
                                             records, scored=scored))
                pending = _backpressure(pending, pool.max_lag, folder, keep=t.keep_weights)
                metrics["scoring_lag"] = len(pending)
            checkpoint = _checkpoint(model, opt, sched, epoch)
            record_epoch(spec.run_name, metrics)
            if progress is not None:
                progress.put(metrics)
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)  # persisted by report
    if rank == 0:
        _backpressure(pending, 0, folder, keep=t.keep_weights)


def _hand_to_pool(pool, folder: RunFolder, epoch: int, model_state: dict | None,
                  records: np.ndarray, *, scored: bool = True):
    """Hand the epoch's weights and training records ((len(TRAINING_RECORDS), N), as
    `_train_epoch` returns them) to every actor (``model_state`` None or ``scored`` False: an
    epoch the run does not score; the actors keep its records only, and its weights, when given
    (--keep-weights), go to the file only).

    Both also go to the run folder until the epoch is scored: if this worker dies, the object it
    owns dies with it, and a restarted run re-submits from the file. The file holds tensors and
    ints only (one float32 tensor per record name), so `_catch_up` reads it with
    ``weights_only=True``.
    """
    weights = None if model_state is None else {k: v.detach().cpu() for k, v in model_state.items()}
    training = {name: row.astype(np.float32) for name, row in zip(TRAINING_RECORDS, records,
                                                                    strict=True)}
    buf = io.BytesIO()
    torch.save({"epoch": epoch, "weights": weights,
                **{name: torch.from_numpy(row) for name, row in training.items()}}, buf)
    storage.write_bytes(folder.epoch_weights(epoch), buf.getvalue())
    return epoch, pool.submit(epoch, weights if scored else None, training)


def _catch_up(pool, folder: RunFolder, start: int, *,
              scores: Callable[[int], bool] | None = None) -> list[tuple[int, list]]:
    """Re-submit epochs trained before ``start`` whose scoring may not have finished (their
    files remain; with --keep-weights all do); actors skip epochs they already scored, and an
    epoch ``scores`` says is not scored hands its records only. A file written before raycurv
    kept margins holds ``train_loss`` only: its epoch's margins stay missing (no co-scores)."""
    pending = []
    for location in storage.list_files(folder.epochs):
        saved = torch.load(io.BytesIO(storage.read_bytes(location)), weights_only=True)
        if saved["epoch"] < start:
            training = {name: saved[name].numpy() for name in TRAINING_RECORDS if name in saved}
            scored = scores is None or scores(saved["epoch"])
            pending.append((saved["epoch"], pool.submit(saved["epoch"], saved["weights"] if scored
                                                        else None, training)))
    return pending


def _backpressure(pending: list[tuple[int, list]], max_lag: int, folder: RunFolder, *,
                  keep: bool = False) -> list[tuple[int, list]]:
    """Forget epochs whose scoring finished (and delete their files, unless ``keep``: the run
    keeps its per-epoch weights, --keep-weights), oldest first; block while more than
    ``max_lag`` epochs are in flight."""
    while pending:
        epoch, refs = pending[0]
        timeout = None if len(pending) > max_lag else 0
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(done) < len(refs):
            break
        ray.get(refs)  # raises if scoring failed for good
        if not keep:
            storage.delete(folder.epoch_weights(epoch))
        pending = pending[1:]
    return pending


def _checkpoint(model, opt, sched, epoch: int) -> ray.train.Checkpoint:
    """state.pt: the model's, optimizer's and schedule's state dicts (tensors, numbers, lists; a
    LambdaLR keeps None for its lambda) and the epoch, all `_load_checkpoint` can read with
    ``weights_only=True``."""
    folder = tempfile.mkdtemp(prefix="raycurv-ckpt-")
    torch.save({"model": getattr(model, "module", model).state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch}, os.path.join(folder, "state.pt"))
    return ray.train.Checkpoint.from_directory(folder)


def _show(steps: Steps, m: dict[str, Any]) -> None:
    """What rank 0 reports: ``{"start": epoch}`` once it is ready to train, then each epoch's metrics."""
    if "start" in m:
        steps.begin(m["start"])
    else:
        steps.step(epoch_note(m), done=m["epoch"] + 1)


def epoch_note(m: dict[str, Any]) -> str:
    """What the progress of an epoch says about it (``metrics`` as the loop reports them)."""
    note = (f"train loss {m['train_loss']:.4f}  acc {m['train_acc']:.4f}  "
            f"{m['train_samples_per_s']:.0f} samples/s trained")
    if "scoring_lag" in m:
        note += f"  scoring lag {m['scoring_lag']} epoch(s)"
    return note


def fit(spec: ScoreSpec, data: Prepared, pool, *, extra_config: dict[str, Any] | None = None,
        verbose: bool = False):
    """Run ``train_loop_per_worker`` on a TorchTrainer (``spec.train.workers`` DDP workers,
    checkpoints under the run folder); ``pool`` a CurvaturePool, or None to train only.
    ``extra_config`` reaches the loop (test hooks). Ray Train's own INFO lines (checkpoints,
    reports, worker group) reach the console only when ``verbose``; rank 0 reports each epoch
    to this process, which shows it (raycurv.progress: a bar on a terminal, else one line per
    epoch). Returns Ray Train's Result."""
    t = spec.train
    datasets = None
    if data.store is not None:  # streamed: Ray Train splits it among the workers
        datasets = {"train": data.store.dataset(multiple_of=t.workers)}
    steps = Steps("epoch", t.epochs, unit="epoch")
    with steps, Relay(functools.partial(_show, steps)) as relay:
        return _trainer(spec, data, pool, datasets, relay.queue, extra_config=extra_config,
                        verbose=verbose).fit()


def _trainer(spec: ScoreSpec, data: Prepared, pool, datasets, progress, *,
             extra_config: dict[str, Any] | None, verbose: bool) -> TorchTrainer:
    t = spec.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.gpus_per_worker else {})}
    return TorchTrainer(
        train_loop_per_worker, datasets=datasets,
        # the same order every run; options given whole (Ray Train's defaults copy a deprecated
        # option, and its DatasetManager warns about it in every run)
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        train_loop_config={"spec": spec.model_dump(), "data": ray.put(TrainData.of(data)),
                           "pool": pool, "verbose": verbose, "progress": progress,
                           **(extra_config or {})},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=TRAIN_DIR, storage_path=RunFolder(spec.run_dir).train_storage(),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
    )
