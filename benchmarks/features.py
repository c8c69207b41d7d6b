"""Intermediate-layer (feature) distillation on MNIST-1D: does it help, and what does it cost per step?

**Part 1, accuracy.** Data: MNIST-1D (``MNIST1DDataModule(data_seed=42)``: 4000 train / 1000 test, normalised,
batch 100, the training order seeded with the run's seed). For every seed ``s`` (0, 1, ... ``--seeds - 1``):

* Teacher: ``MNIST1DTeacher(channels=32)`` trained as in ``lightning-distill demo`` (``seed_everything(s)``,
  ``DistillModule(alpha=0)``, Adam lr 5e-3, no schedule, ``--teacher-epochs`` epochs), then frozen.
* Student: the narrower CNN ``MNIST1DTeacher(channels=8)``, trained four ways with the **same recipe**: the same
  initial weights and data order (``seed_everything(s)`` before each), Adam lr 1e-2 with a cosine schedule over
  ``--epochs`` epochs, batch 100, no augmentation. Only the loss differs:

  ``alone``      cross-entropy only (``alpha=0``, no callback);
  ``kd``         Hinton KD, ``alpha=0.9``, ``T=4``;
  ``kd+fitnets`` KD + three FitNets maps ``features.act{i}`` -> ``features.act{i}`` (``loss="mse"``, projector
                 ``"auto"``, which builds a conv1x1 8 -> 32 channels per map, trained with the student), each of
                 weight ``--fm-weight``;
  ``kd+at``      KD + three attention-transfer maps on the same layers (``loss="attention"``, no projector),
                 each of weight ``--at-weight``.

  The default weights (0.1 per FitNets map, 300 per attention map) were picked once, on another data set (data
  seed 7331, seeds 0-1, 60 epochs), as the best mean of FitNets 0.03 / 0.1 / 1 / 10 (75.5 / 78.6 / 77.6 / 71.3 %)
  and attention 30 / 100 / 300 / 1000 (79.3 / 79.5 / 80.4 / 73.2 %); alone 77.0 %, KD 76.0 % there.

  No validation runs during training; after the last epoch the student is tested once on the 1000 test samples.
  Reported: test accuracy mean ± std over seeds, every seed's figure, and the gain over ``alone`` (mean ± std of
  the per-seed differences, which are paired: same seed, same initial weights, same batches).

**Part 2, step-time overhead of N feature maps.** The same teacher (random weights, frozen: only its cost matters)
and student architectures, KD always on (``alpha=0.9``, ``T=4``), Adam lr 1e-2, with 0, 1, 2 or 3 FitNets maps
(``act1``; ``act1, act2``; all three). Each round runs one fresh fit per variant (``--timing-epochs`` epochs of the
4000 training samples, in-memory ``DataLoader``, same initial weights and order), rotating the variant order
every round. The step time is measured exactly as in ``overhead.py`` (its timing callbacks are reused): from
``on_train_batch_start`` of a callback placed before ``DistillationCallback`` (so the teacher forward and its
feature hooks are inside) to ``on_train_batch_end`` of one placed after it, i.e. teacher forward, student forward
with feature capture, projectors, all losses, backward and the Adam step. The first epoch of each fit is warm-up
and dropped. Reported: the median step time over all kept steps [p25-p75], and the ratio to 0 maps as the median
over rounds of the within-round ratio of medians (and the ratio of the fastest rounds).

Run from the repository root::

    python benchmarks/features.py                          # 3 seeds x 60 epochs + 10 timing rounds, ~5 min
    python benchmarks/features.py --quick                  # smoke run, ~10 s (tests/test_benchmarks.py)
    python benchmarks/features.py --part accuracy --seeds 5 --fm-weight 1.0 --at-weight 100

``--plot PATH`` also draws the test accuracy per variant and the step time against the number of maps to a PNG.
``--threads`` defaults to 1: the models are tiny, and with 2 threads on 2 cores any other busy process slows
every step many-fold. Timings on a shared machine vary by 5-10 %; compare ratios, never assert on them.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import lightning as L
import torch
from common import (
    RunTimes,
    bar_panel,
    benchmark_trainer,
    machine_description,
    mean_std,
    pyplot,
    quartiles,
    save_figure,
    start_run,
)
from overhead_variants import Config as TimingConfig
from overhead_variants import fit_with_timers, make_dataset
from torch import nn
from torch.utils.data import TensorDataset

from lightning_distill import DistillationCallback, DistillModule, FeatureMap
from lightning_distill.demos import MNIST1DDataModule, MNIST1DTeacher
from lightning_distill.losses.functional import FeatureLossName

Variant = Literal["alone", "kd", "kd+fitnets", "kd+at"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
MAX_MAPS = 3
ALPHA = 0.9
TEMPERATURE = 4.0
TEACHER_LR = 5e-3
STUDENT_LR = 1e-2
TEACHER_CHANNELS = 32
STUDENT_CHANNELS = 8
ACCURACY_HEADER = "| student (CNN, 8 channels) | test acc (mean ± std) | gain vs alone (pts) | per seed | fit s |"
OVERHEAD_HEADER = "| feature maps (+ logit KD) | median step ms [p25-p75] | ratio vs 0 maps | best rounds |"


@dataclass(frozen=True)
class Config:
    """Everything that defines one run (both parts)."""

    seeds: int
    epochs: int
    teacher_epochs: int
    fm_weight: float
    at_weight: float
    data_seed: int
    num_train: int | None
    num_test: int | None
    threads: int
    rounds: int
    timing_epochs: int
    limit_batches: int | None
    clock: Literal["wall", "thread"]


@dataclass(frozen=True)
class Result:
    """One trained model's test accuracy and fit time."""

    model: str
    seed: int
    test_acc: float
    fit_seconds: float


# ---------------------------------------------------------------------------------------------- shared pieces
def feature_maps(variant: Variant, count: int, fm_weight: float, at_weight: float) -> list[FeatureMap]:
    """The first ``count`` maps ``features.act{i}`` -> ``features.act{i}`` of a variant (none for alone and kd)."""
    if variant in ("alone", "kd") or count == 0:
        return []
    loss: FeatureLossName = "attention" if variant == "kd+at" else "mse"
    weight = at_weight if variant == "kd+at" else fm_weight
    return [
        FeatureMap(student=f"features.act{i}", teacher=f"features.act{i}", loss=loss, weight=weight)
        for i in range(1, count + 1)
    ]


def make_student(seed: int, alpha: float, maps: list[FeatureMap], epochs: int | None) -> DistillModule:
    """The 8-channel CNN student (initial weights fixed by ``seed``), cosine schedule over ``epochs`` if given."""
    L.seed_everything(seed, verbose=False)
    return DistillModule(
        student=MNIST1DTeacher(channels=STUDENT_CHANNELS),
        alpha=alpha,
        temperature=TEMPERATURE,
        feature_maps=maps,
        optimizer=functools.partial(torch.optim.Adam, lr=STUDENT_LR),
        lr_scheduler=None
        if epochs is None
        else functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )


# ------------------------------------------------------------------------------------------- part 1: accuracy
def _datamodule(config: Config, seed: int) -> MNIST1DDataModule:
    return MNIST1DDataModule(
        data_seed=config.data_seed, num_train=config.num_train, num_test=config.num_test, shuffle_seed=seed
    )


def _fit_and_test(
    config: Config, name: str, seed: int, module: DistillModule, epochs: int, callbacks: list[L.Callback]
) -> Result:
    """Fit without validation, then test once; the fit's wall time is recorded."""
    datamodule = _datamodule(config, seed)
    datamodule.setup("fit")
    if datamodule.train_set is None:  # setup() always builds it; keeps type checkers honest
        raise RuntimeError("MNIST1DDataModule.setup did not build a training set.")
    module.example_input_array = datamodule.train_set.tensors[0][:2]  # the projectors' shapes come from it
    trainer = benchmark_trainer(epochs, callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return Result(name, seed, float(metrics["test/acc"]), seconds)


def train_teacher(config: Config, seed: int) -> tuple[nn.Module, Result]:
    """The demo's teacher recipe (Adam 5e-3, no schedule), frozen after training."""
    L.seed_everything(seed, verbose=False)
    module = DistillModule(
        student=MNIST1DTeacher(channels=TEACHER_CHANNELS),
        alpha=0.0,
        optimizer=functools.partial(torch.optim.Adam, lr=TEACHER_LR),
    )
    result = _fit_and_test(config, "teacher", seed, module, config.teacher_epochs, [])
    return module.export_student().requires_grad_(False), result


def run_accuracy(config: Config, log: Callable[[str], None]) -> list[Result]:
    """Per seed: train the teacher, then every student variant with the same recipe."""
    results: list[Result] = []
    for seed in range(config.seeds):
        teacher, teacher_result = train_teacher(config, seed)
        results.append(teacher_result)
        log(f"seed {seed}: teacher {100 * teacher_result.test_acc:.1f} % ({teacher_result.fit_seconds:.0f} s)")
        for variant in VARIANTS:
            maps = feature_maps(variant, MAX_MAPS, config.fm_weight, config.at_weight)
            module = make_student(seed, 0.0 if variant == "alone" else ALPHA, maps, config.epochs)
            callbacks: list[L.Callback] = [] if variant == "alone" else [DistillationCallback(teacher)]
            result = _fit_and_test(config, variant, seed, module, config.epochs, callbacks)
            results.append(result)
            log(f"seed {seed}: {variant} {100 * result.test_acc:.1f} % ({result.fit_seconds:.0f} s)")
    return results


def accuracies(results: Sequence[Result], model: str) -> list[float]:
    """Test accuracies (%) of one model (``"teacher"`` or a variant), in seed order."""
    return [100 * r.test_acc for r in results if r.model == model]


def accuracy_table(config: Config, results: Sequence[Result]) -> list[str]:
    """Markdown table: teacher and every student variant, mean ± std over seeds and the paired gain."""
    lines = [ACCURACY_HEADER, "|---|---:|---:|---|---:|"]
    alone = accuracies(results, "alone")
    labels = {
        "teacher": f"teacher (CNN, {TEACHER_CHANNELS} ch., {config.teacher_epochs} ep.)",
        "alone": "alone (CE only)",
        "kd": f"logit KD (alpha={ALPHA}, T={TEMPERATURE:g})",
        "kd+fitnets": f"logit KD + 3 FitNets maps (mse, conv1x1, w={config.fm_weight:g})",
        "kd+at": f"logit KD + 3 attention maps (w={config.at_weight:g})",
    }
    for model, label in labels.items():
        values = accuracies(results, model)
        gain = "" if model == "teacher" else mean_std([v - a for v, a in zip(values, alone, strict=True)])
        seconds = statistics.mean(r.fit_seconds for r in results if r.model == model)
        per_seed = " / ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {label} | {mean_std(values)} % | {gain} | {per_seed} | {seconds:.1f} |")
    lines += [
        "",
        f"Test accuracy on the {config.num_test or 1000} MNIST-1D test samples after the last epoch; "
        f"{config.seeds} seed(s) (0..{config.seeds - 1}): teacher, student init and data order per seed; data seed "
        f"{config.data_seed}, {config.num_train or 4000} training samples. Students: Adam lr {STUDENT_LR:g}, cosine "
        f"over {config.epochs} epochs, batch 100, no augmentation, the same for every row. Gain: mean ± std of the "
        "per-seed differences to alone. Fit s: mean wall time of one fit.",
    ]
    return lines


# ------------------------------------------------------------------------------------------- part 2: overhead
def fit_timed(
    count: int, teacher: nn.Module, dataset: TensorDataset, timing: TimingConfig, fm_weight: float
) -> RunTimes:
    """One timed fit with ``count`` FitNets maps and logit KD, through ``overhead.py``'s timing callbacks."""
    module = make_student(timing.seed, ALPHA, feature_maps("kd+fitnets", count, fm_weight, 0.0), None)
    module.example_input_array = dataset.tensors[0][:2]
    return fit_with_timers(module, [DistillationCallback(copy.deepcopy(teacher))], dataset, timing)


def run_overhead(config: Config, log: Callable[[str], None]) -> list[dict[int, RunTimes]]:
    """Every map count once per round, the order rotated each round."""
    timing = TimingConfig(
        rounds=config.rounds,
        epochs=config.timing_epochs,
        threads=config.threads,
        batch_size=100,
        limit_batches=config.limit_batches,
        seed=0,
        data_seed=config.data_seed,
        clock=config.clock,
    )
    dataset = make_dataset(config.data_seed)
    torch.manual_seed(timing.seed + 1)
    teacher = MNIST1DTeacher(channels=TEACHER_CHANNELS).requires_grad_(False).eval()
    counts = list(range(MAX_MAPS + 1))
    rounds: list[dict[int, RunTimes]] = []
    for index in range(config.rounds):
        order = counts[index % len(counts) :] + counts[: index % len(counts)]
        times = {n: fit_timed(n, teacher, dataset, timing, config.fm_weight) for n in order}
        rounds.append(times)
        medians = ", ".join(f"{n} maps {statistics.median(times[n].kept()[0]) * 1e3:.2f} ms" for n in counts)
        log(f"timing round {index + 1}/{config.rounds}: {medians}")
    return rounds


def ratio_vs_none(rounds: Sequence[dict[int, RunTimes]], count: int) -> float:
    """Median over rounds of the ratio of ``count`` maps' median step time to 0 maps' one."""
    return statistics.median(statistics.median(r[count].kept()[0]) / statistics.median(r[0].kept()[0]) for r in rounds)


def overhead_table(config: Config, rounds: Sequence[dict[int, RunTimes]]) -> list[str]:
    """Markdown table: median step time per map count and its ratio to 0 maps."""
    lines = [OVERHEAD_HEADER, "|---|---:|---:|---:|"]
    counts = sorted(rounds[0])
    best = {n: min(statistics.median(r[n].kept()[0]) for r in rounds) for n in counts}
    for count in counts:
        p25, median, p75 = quartiles([s * 1e3 for r in rounds for s in r[count].kept()[0]])
        layers = ", ".join(f"act{i}" for i in range(1, count + 1)) or "none"
        lines.append(
            f"| {count} ({layers}) | {median:.3f} [{p25:.3f}-{p75:.3f}] | {ratio_vs_none(rounds, count):.3f} "
            f"| {best[count] / best[0]:.3f} |"
        )
    clock = "time.thread_time (main-thread CPU time)" if config.clock == "thread" else "time.perf_counter"
    lines += [
        "",
        f"{config.rounds} round(s) x {config.timing_epochs} epoch(s) per variant (first epoch dropped), batch 100, "
        f"limit_batches {config.limit_batches}, clock {clock}. Step: teacher forward + student forward + "
        "projectors + losses + backward + Adam step. Ratio: median over rounds of per-round ratios of medians; "
        "best rounds: ratio of each variant's fastest round.",
    ]
    return lines


def plot(results: Sequence[Result] | None, rounds: Sequence[dict[int, RunTimes]] | None, path: Path) -> str:
    """Left: student test accuracy per variant; right: step time against the number of maps (the parts run)."""
    plt = pyplot()

    panels = int(results is not None) + int(rounds is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    left, right = axes[0][0], axes[0][-1]
    if results is not None:
        values = {variant: accuracies(results, variant) for variant in VARIANTS}
        bar_panel(left, values, "test acc (%)", "Student test accuracy (mean ± std; dots: seeds)", zoom=True)
    if rounds is not None:
        counts = sorted(rounds[0])
        steps = [quartiles([s * 1e3 for r in rounds for s in r[n].kept()[0]]) for n in counts]  # [p25, p50, p75]
        spread = [[q[1] - q[0] for q in steps], [q[2] - q[1] for q in steps]]
        right.errorbar(counts, [q[1] for q in steps], yerr=spread, marker="o", capsize=3, label="median step [p25-p75]")
        for count, q in zip(counts, steps, strict=True):
            ratio = ratio_vs_none(rounds, count)
            right.annotate(f"{ratio:.2f}x", (count, q[1]), xytext=(6, -10), textcoords="offset points", fontsize=8)
        right.set(xticks=counts, xlabel="FitNets feature maps (+ logit KD)", ylabel="step time (ms)", ylim=(0, None))
        right.set_title("Step time vs number of maps (ratio vs 0 maps)")
        right.legend(fontsize=8, loc="lower right")
        right.grid(alpha=0.3)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--part", choices=("both", "accuracy", "overhead"), default="both")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (teacher, student init, data order)")
    parser.add_argument("--epochs", type=int, default=60, help="student epochs (every variant)")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs (the demo's default)")
    parser.add_argument("--fm-weight", type=float, default=0.1, help="weight of each FitNets (mse) map")
    parser.add_argument("--at-weight", type=float, default=300.0, help="weight of each attention-transfer map")
    parser.add_argument("--data-seed", type=int, default=42, help="MNIST-1D data seed")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=10, help="timing rounds (one fit per map count each)")
    parser.add_argument("--timing-epochs", type=int, default=3, help="epochs per timed fit; the first is warm-up")
    parser.add_argument("--limit-batches", type=int, default=None, help="batches per timed epoch (default: all)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall", help="as in overhead.py")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs, 400 samples, 1 round")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report here")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the results to this PNG")
    args = parser.parse_args(argv)
    args.num_train = args.num_test = None
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs, args.num_train, args.num_test = 1, 2, 2, 400, 200
        args.rounds, args.timing_epochs, args.limit_batches = 1, 2, 5
    for name in ("seeds", "epochs", "teacher_epochs", "threads", "rounds", "timing_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("fm_weight", "at_weight"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.limit_batches is not None and args.limit_batches < 1:
        parser.error(f"--limit-batches must be >= 1, got {args.limit_batches}")
    if args.clock == "thread" and args.threads != 1:
        parser.error(f"--clock thread needs --threads 1 (it counts the main thread only), got --threads {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config(**{name: getattr(args, name) for name in Config.__dataclass_fields__})
    run = start_run("features.py", argv, config.threads)
    command, load_at_start, log = run.command, run.load_at_start, run.log
    lines = [
        f"## Feature distillation on MNIST-1D: `{command}`",
        "",
        *machine_description(config.threads, load_at_start),
        "",
    ]
    results = rounds = None
    if args.part in ("both", "accuracy"):
        results = run_accuracy(config, log)
        lines += ["### Accuracy", "", *accuracy_table(config, results), ""]
    if args.part in ("both", "overhead"):
        rounds = run_overhead(config, log)
        lines += ["### Step time with N feature maps", "", *overhead_table(config, rounds), ""]
    if args.plot is not None:
        lines.append(plot(results, rounds, args.plot))
    return run.finish(lines, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
