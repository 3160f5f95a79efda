"""Throughput of raycurv's curvature estimator, side by side with the authors' formulation, a
plain training epoch and the limit (n + 1 input-gradient passes), on the same model, data and
machine in one run.

    python -m bench.estimator                        # small CNN at 8x8 and 28x28, ResNet-18 at 32x32
    python -m bench.estimator --cases fmnist --reps 9
    python -m bench.estimator --hvp --compile        # also method="hvp" and torch.compile
    python -m bench.estimator --device cuda --hvp    # on a GPU (bench/gpu.sh runs this)

Every fp32 method runs in IEEE fp32 (on CUDA: TF32 off, as raycurv's finite differences run).
Repetitions are interleaved (every method once per round, the order rotated each round) and
medians of per-round ratios are reported, so that a machine shared with other work slows all
methods alike. With one intra-op thread (the default: a Ray actor with a fractional CPU runs with
OMP_NUM_THREADS=1) the clock is the process's CPU time, which the descheduling of a busy machine
does not inflate; otherwise wall time.

Methods (per scoring batch of B samples, n probes; synthetic inputs and labels):
  raycurv    prepare_for_scoring once, then curvature() per batch: what a curvature actor runs
  plain      curvature() on the model as trained (g(x) once, probes batched, nothing else)
  authors    the authors' formulation from its definition: for every probe evaluate f(x + h v)
             and f(x) again and differentiate the batch-mean loss difference (2n passes)
  limit      n + 1 input-gradient passes of the batch on the scoring model, at its pass size:
             what any estimator needing n + 1 gradients must at least spend
  limit_plain  the same n + 1 passes on the model as trained
  train      a training epoch's work per sample: SGD steps of 64 samples
  hvp        (--hvp) curvature(method="hvp") on the scoring model, exact H v
  compiled   (--compile) the scoring model through torch.compile
  hvp_half   (--half bf16|fp16) method="hvp" in half precision; train_half: training under autocast
  (--half also reports, untimed, what autocast does to the authors' finite difference)
The output ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from raycurv.curvature import curvature, ieee_fp32, input_gradient, rademacher_probes, scoring_mode
from raycurv.models import CifarResNet18, SmallCNN
from raycurv.scoring_model import prepare_for_scoring

CASES = {  # name: (model builder, input shape, scoring batch)
    "digits": (lambda: SmallCNN(1, 10), (1, 8, 8), 256),
    "fmnist": (lambda: SmallCNN(1, 10), (1, 28, 28), 256),
    "cifar-resnet18": (lambda: CifarResNet18(3, 10), (3, 32, 32), 64),
}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
PASS_SIZES = {  # pass sizes whose time per sample is compared (the curve behind max_pass_size)
    "digits": [256, 512, 1024, 2048, 4096],
    "fmnist": [64, 128, 256, 512],
    "cifar-resnet18": [16, 32, 64, 128],
}


def authors_formulation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, *,
                        epoch: int, seed: int, h: float, n: int) -> torch.Tensor:
    """The authors' estimator ("norm"), from its definition: per probe, f(x + h v) and f(x) are
    both evaluated, the gradient of the batch-mean loss difference is taken with respect to the
    input, and ||grad|| (times B, undoing the mean) is averaged over probes. The model is in eval
    mode with its parameters requiring gradients, as a model coming out of training does. Probes
    are raycurv's, so that both compute the same values."""
    model.eval()
    total = torch.zeros(len(x), device=x.device)
    for j in range(n):
        v = rademacher_probes(seed=seed, epoch=epoch, sample_ids=ids,
                              probe_indices=torch.tensor([j], device=x.device),
                              shape=tuple(x.shape[1:]), dtype=x.dtype)[0]
        xr = x.clone().requires_grad_(True)
        diff = F.cross_entropy(model(xr + h * v), y) - F.cross_entropy(model(xr), y)
        (g,) = torch.autograd.grad(diff, xr)
        total += g.reshape(len(x), -1).norm(dim=1)
    return total / n * len(x)


def gradient_passes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, passes: int,
                    max_pass: int) -> None:
    """``passes`` input-gradient passes over x, cut into passes of at most ``max_pass`` samples."""
    with scoring_mode(model):
        for _ in range(passes):
            for a in range(0, len(x), max_pass):
                input_gradient(model, x[a:a + max_pass], y[a:a + max_pass])


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, xs: torch.Tensor, ys: torch.Tensor,
                batch: int = 64, half: torch.dtype | None = None) -> None:
    """SGD steps of ``batch`` samples; ``half``: under torch.autocast (mixed-precision training)."""
    model.train()
    amp = torch.autocast(xs.device.type, dtype=half) if half else contextlib.nullcontext()
    for i in range(0, len(xs), batch):
        with amp:
            logits = model(xs[i:i + batch])
        loss = F.cross_entropy(logits.float(), ys[i:i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How far scores ``a`` are from scores ``b`` of the same samples and probes (relative)."""
    a, b = a.double().cpu(), b.double().cpu()
    rel = (a - b).abs() / b.abs().clamp_min(1e-30)
    return {"median_rel": float(rel.median()), "max_rel": float(rel.max()),
            "share_within_1e-5": float((rel <= 1e-5).double().mean())}


def warmed_model(build: Callable[[], nn.Module], shape: tuple[int, ...], device: torch.device
                 ) -> nn.Module:
    """A model whose batch-norm running statistics have moved off their initial values."""
    torch.manual_seed(0)
    model = build().to(device)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, *shape, device=device) * 1.5 + 0.2)
    return model


def run_case(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    build, shape, batch = CASES[name]
    batch = args.batch or batch
    n, h = args.probes, args.h
    model = warmed_model(build, shape, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    ids = torch.arange(10_000, 10_000 + batch, device=device)
    xt = torch.randn(args.train_samples, *shape, generator=gen).to(device)
    yt = torch.randint(0, 10, (args.train_samples,), generator=gen).to(device)
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    tic = time.perf_counter()
    scoring = prepare_for_scoring(model, x)  # once per epoch's weights in a scoring run
    prepare_s = time.perf_counter() - tic
    common = dict(sample_ids=ids, epoch=3, seed=7, h=h, probes=n)

    def ours() -> torch.Tensor:
        return curvature(scoring.module, x, y, max_pass=scoring.max_pass, **common).curvature

    def authors() -> torch.Tensor:
        return authors_formulation(model, x, y, ids, epoch=3, seed=7, h=h, n=n)

    methods: dict[str, tuple[Callable[[], object], int]] = {
        "raycurv": (ours, batch),
        "plain": (lambda: curvature(model, x, y, **common), batch),
        "authors": (authors, batch),
        "limit": (lambda: gradient_passes(scoring.module, x, y, passes=n + 1,
                                          max_pass=scoring.max_pass), batch),
        "limit_plain": (lambda: gradient_passes(model, x, y, passes=n + 1, max_pass=512), batch),
        "train": (lambda: train_epoch(trained, opt, xt, yt), args.train_samples),
    }
    # the same probes, so the same values: checked before timing anything
    plain = curvature(model, x, y, **common).curvature
    agree = {"raycurv_vs_plain": agreement(ours(), plain), "authors_vs_plain": agreement(authors(), plain)}
    if args.hvp:
        methods["hvp"] = (lambda: curvature(scoring.module, x, y, max_pass=scoring.max_pass,
                                            method="hvp", **common), batch)
    if args.half:
        half = HALF[args.half]
        methods["hvp_half"] = (lambda: curvature(scoring.module, x, y, max_pass=scoring.max_pass,
                                                 method="hvp", precision=args.half, **common), batch)
        methods["train_half"] = (lambda: train_epoch(trained, opt, xt, yt, half=half), args.train_samples)
        exact = curvature(scoring.module, x, y, max_pass=scoring.max_pass, method="hvp", **common)
        agree["hvp_vs_plain_fd"] = agreement(exact.curvature, plain)
        agree["hvp_half_vs_hvp"] = agreement(methods["hvp_half"][0]().curvature, exact.curvature)
        with torch.autocast(device.type, dtype=half):
            agree["authors_autocast_vs_plain"] = agreement(authors(), plain)
    if args.compile:
        compiled = prepare_for_scoring(model, x, compile=True)
        methods["compiled"] = (lambda: curvature(compiled.module, x, y, max_pass=compiled.max_pass,
                                                 **common), batch)
        tic = time.perf_counter()
        agree["compiled_vs_plain"] = agreement(methods["compiled"][0]().curvature, plain)
        compile_s = time.perf_counter() - tic
    sizes = [] if args.no_pass_sizes else PASS_SIZES[name]
    for size in sizes:  # each about max(sizes) samples' work
        xp, yp = x.repeat(-(-size // batch), *[1] * len(shape))[:size], y.repeat(-(-size // batch))[:size]
        passes = -(-max(sizes) // size)
        methods[f"pass_{size}"] = (lambda xp=xp, yp=yp, k=passes: gradient_passes(
            scoring.module, xp, yp, passes=k, max_pass=len(xp)), passes * size)
    for fn, _ in methods.values():  # warm-up: allocator, lazy initialisation
        fn()
    names = list(methods)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    reps = args.reps if "resnet" not in name else args.resnet_reps
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(timed(methods[k][0], device))
        print(f"  {name}: round {r + 1}/{reps}", file=sys.stderr, flush=True)
    clock = 1 if args.clock == "cpu" else 0

    def per_sample(k: str) -> list[float]:
        return [t[clock] / methods[k][1] for t in times[k]]

    def ratio(num: str, den: str) -> float:
        """Median over rounds of the per-sample time of ``num`` over that of ``den``."""
        return statistics.median(a / b for a, b in zip(per_sample(num), per_sample(den), strict=True))

    result = {
        "batch": batch, "probes": n, "h": h, "rounds": reps, "max_pass": scoring.max_pass,
        "folded_batch_norms": scoring.folded, "prepare_seconds": round(prepare_s, 4),
        "samples_per_s": {k: round(1 / statistics.median(per_sample(k)), 2) for k in names},
        "speedup_vs_authors": ratio("authors", "raycurv"),
        "speedup_plain_vs_authors": ratio("authors", "plain"),
        "speedup_vs_plain": ratio("plain", "raycurv"),
        "fraction_of_limit": ratio("limit", "raycurv"),
        "fraction_of_plain_limit": ratio("limit_plain", "raycurv"),
        "scored_epoch_in_training_epochs": ratio("raycurv", "train"),
        "authors_epoch_in_training_epochs": ratio("authors", "train"),
        "pass_size_relative_time": {str(s): statistics.median(per_sample(f"pass_{s}")) for s in sizes},
        "agreement": agree,
    }
    if sizes:
        fastest = min(result["pass_size_relative_time"].values())
        result["pass_size_relative_time"] = {s: round(t / fastest, 3)
                                             for s, t in result["pass_size_relative_time"].items()}
    if args.hvp:
        result["hvp_cost_vs_raycurv"] = ratio("hvp", "raycurv")
    if args.half:
        result["hvp_half_cost_vs_raycurv"] = ratio("hvp_half", "raycurv")
        result["train_half_speedup"] = ratio("train", "train_half")
        result["scored_epoch_in_half_training_epochs"] = ratio("raycurv", "train_half")
    if args.compile:
        result["compiled_speedup_vs_raycurv"] = ratio("raycurv", "compiled")
        result["compile_seconds"] = round(compile_s, 1)
    return result


def report(name: str, r: dict, clock: str) -> None:
    print(f"\n{name}: scoring batch {r['batch']}, n = {r['probes']}, h = {r['h']}, {r['rounds']} rounds, "
          f"clock {clock}; passes of <= {r['max_pass']} samples, {r['folded_batch_norms']} batch norms "
          f"folded (prepared in {r['prepare_seconds']:.3f} s)")
    for k, v in r["samples_per_s"].items():
        if not k.startswith("pass_"):
            print(f"  {k:<12} {v:10.1f} samples/s")
    print(f"  raycurv / authors' formulation      {r['speedup_vs_authors']:.2f}x "
          f"(plain: {r['speedup_plain_vs_authors']:.2f}x; scoring model: {r['speedup_vs_plain']:.2f}x)")
    print(f"  fraction of the limit (n+1 passes)  {r['fraction_of_limit']:.2f} "
          f"(of n+1 passes on the model as trained: {r['fraction_of_plain_limit']:.2f})")
    print(f"  one scored epoch costs              {r['scored_epoch_in_training_epochs']:.1f} training "
          f"epochs (authors': {r['authors_epoch_in_training_epochs']:.1f})")
    if r["pass_size_relative_time"]:
        print("  time per sample by pass size        " + ", ".join(
            f"{m}: {v:.2f}" for m, v in r["pass_size_relative_time"].items()))
    if "hvp_cost_vs_raycurv" in r:
        print(f"  hvp costs                           {r['hvp_cost_vs_raycurv']:.2f}x raycurv's fd")
    if "hvp_half_cost_vs_raycurv" in r:
        print(f"  hvp in half precision costs         {r['hvp_half_cost_vs_raycurv']:.2f}x raycurv's fd; "
              f"half-precision training {r['train_half_speedup']:.2f}x faster than fp32")
    if "compiled_speedup_vs_raycurv" in r:
        print(f"  torch.compile                       {r['compiled_speedup_vs_raycurv']:.2f}x "
              f"(compiled in {r['compile_seconds']} s)")
    for k, a in r["agreement"].items():
        print(f"  {k:<20} median rel {a['median_rel']:.1e}  max rel {a['max_rel']:.1e}  "
              f"within 1e-5: {a['share_within_1e-5']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--h", type=float, default=0.03)
    parser.add_argument("--batch", type=int, default=None, help="scoring batch (default per case)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--resnet-reps", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=256)
    parser.add_argument("--no-pass-sizes", action="store_true", help="skip the pass-size curve")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hvp", action="store_true", help="also time method='hvp'")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--half", choices=sorted(HALF), default=None,
                        help="also time hvp and training in half precision")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            parser.error(f"unknown case {c!r}; valid: {', '.join(CASES)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.clock = "cpu" if args.threads == 1 and device.type == "cpu" else "wall"
    results = {}
    for name in cases:
        with ieee_fp32(device):  # every fp32 method in IEEE fp32 (no TF32 on CUDA), like for like
            results[name] = run_case(name, args, device)
        report(name, results[name], args.clock)
    print(json.dumps({
        "bench": "estimator", "device": str(device), "threads": args.threads, "clock": args.clock,
        "tf32": False,
        "torch": torch.__version__, "cases": results,
        "targets": {"speedup_vs_authors>=2.0": {k: r["speedup_vs_authors"] >= 2.0 for k, r in results.items()},
                    "fraction_of_limit>=0.85": {k: r["fraction_of_limit"] >= 0.85 for k, r in results.items()}},
    }))


if __name__ == "__main__":
    main()
