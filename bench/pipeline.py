"""How much of scoring hides behind training: a scoring run against the same training with
scoring off, measured side by side (alternating, medians), plus scoring alone.

    python bench/pipeline.py [--dataset digits --epochs 6 --reps 2]

hidden share = (train_only + scoring_alone - scoring_run) / scoring_alone: 1 means scoring cost
no wall time at all, 0 means it ran after training instead of beside it. On a 2-core machine the
worker and the actor share the cores, so little can hide; on a GPU cluster, with an actor per
training GPU, the target is a scoring run within 1.3x of training alone.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch

from bench._runs import run_args, spec, start_ray, timed
from raycurv.actors import ShardScorer, ShardSpec
from raycurv.data import prepare_dataset
from raycurv.models import build_model
from raycurv.run import score_run, validate_spec
from raycurv.train import fit


def train_only(run_spec) -> None:
    fit(run_spec, validate_spec(run_spec), pool=None)


def scoring_alone(run_spec) -> float:
    """Seconds to score every epoch of the run in this process (one core), no training."""
    data = prepare_dataset(run_spec.data, seed=run_spec.seed)
    c = run_spec.curvature
    shard = ShardSpec(index=0, start=0, stop=len(data), epochs=run_spec.train.epochs,
                      model=run_spec.train.model, in_channels=data.input_shape[0],
                      num_classes=data.num_classes, norm=data.norm,
                      seed=run_spec.seed, estimators=((c.h, c.probes, c.variant),),
                      batch_size=c.batch_size, state_uri=f"{run_spec.run_dir}/alone")
    scorer = ShardScorer(shard, data.images, data.labels, data.sample_ids)
    weights = build_model(run_spec.train.model, in_channels=data.input_shape[0],
                          num_classes=data.num_classes).state_dict()
    torch.set_num_threads(1)
    started = time.perf_counter()
    for epoch in range(run_spec.train.epochs):
        scorer.score_epoch(epoch, weights, np.zeros(len(data), np.float32))
    return time.perf_counter() - started


def main() -> None:
    args = run_args(__doc__)
    base = {"data": {"dataset": args.dataset, "limit": args.limit},
            "train": {"epochs": args.epochs}, "curvature": {"actor_cpus": 1.0}}
    start_ray(cpus=2)
    with_scoring, without = [], []
    for rep in range(args.reps):  # alternate, so drifting load hits both alike
        with_scoring.append(timed(score_run, spec(base)))
        without.append(timed(train_only, spec(base)))
        print(f"rep {rep}: scoring run {with_scoring[-1]:.1f} s, training only {without[-1]:.1f} s", flush=True)
    alone_spec = spec(base)
    alone = scoring_alone(alone_spec)
    run_s, train_s = statistics.median(with_scoring), statistics.median(without)
    hidden = (train_s + alone - run_s) / alone
    print(f"scoring run / training only: {run_s / train_s:.2f}x; scoring alone {alone:.1f} s; "
          f"share of scoring hidden behind training {hidden:.2f}")
    print(json.dumps({"dataset": args.dataset, "epochs": args.epochs, "scoring_run_s": run_s,
                      "train_only_s": train_s, "scoring_alone_s": alone,
                      "ratio_scoring_run_to_train_only": run_s / train_s, "hidden_share": hidden}))


if __name__ == "__main__":
    main()
