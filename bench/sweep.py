"""What an h-sweep costs: one training scored with 4 perturbation sizes against the same
training scored with one, side by side (alternating, medians).

    python bench/sweep.py [--dataset digits --epochs 6 --reps 2]

A sweep never retrains for h, n or variant: those are scored on the same epoch models. The
target is <= 1.3x the single-h run's wall time.
"""

from __future__ import annotations

import json
import statistics

from bench._runs import run_args, spec, start_ray, timed
from raycurv.run import score_run

H_VALUES = (0.003, 0.01, 0.03, 0.1)


def main() -> None:
    args = run_args(__doc__)
    base = {"data": {"dataset": args.dataset, "limit": args.limit}, "train": {"epochs": args.epochs}}
    four = {"h": H_VALUES[0], "also": [{"h": h} for h in H_VALUES[1:]]}
    start_ray(cpus=2)
    single, sweep = [], []
    for rep in range(args.reps):
        single.append(timed(score_run, spec(base, curvature={"h": 0.03})))
        sweep.append(timed(score_run, spec(base, curvature=four)))
        print(f"rep {rep}: one h {single[-1]:.1f} s, four h {sweep[-1]:.1f} s", flush=True)
    one, many = statistics.median(single), statistics.median(sweep)
    print(f"4-h sweep / 1-h run: {many / one:.2f}x (target <= 1.3x)")
    print(json.dumps({"dataset": args.dataset, "epochs": args.epochs, "h_values": list(H_VALUES),
                      "single_h_s": one, "four_h_s": many, "ratio": many / one,
                      "target_met": many / one <= 1.3}))


if __name__ == "__main__":
    main()
