"""Overhead of lightning-distill against hand-written knowledge distillation, side by side in one process.

The same teacher, student, data, loss and optimizer are trained three ways:

``plain``
    A plain PyTorch loop with the KD loss written inline with ``torch.nn.functional``.
``lightning``
    A hand-written ``LightningModule`` holding the frozen teacher, with the same inline loss, logging the same three
    terms (``train/loss``, ``train/task_loss``, ``train/kd_loss``) as the plugin.
``plugin``
    ``DistillModule`` + ``DistillationCallback`` (the teacher runs in the callback's ``on_train_batch_start``).

Setup: MNIST-1D (4000 x 40, ``data_seed`` 42, normalised, in memory), batch 100, ``DataLoader(num_workers=0,
shuffle=True)`` with a fixed ``torch.Generator``; teacher = MNIST-1D 1-D CNN (3 x conv32 + linear), random weights,
frozen and in eval mode (its values do not matter for timing); student = MLP 40-256-256-10, same initial weights in
every variant; loss = alpha * T^2 * KL(p_t || p_s) (batchmean) + (1 - alpha) * CE with alpha = 0.9, T = 4; Adam,
lr 1e-2; ``torch.set_num_threads(--threads)``. Both Lightning variants use the same ``Trainer`` settings
(``logger=False``, no checkpointing, progress bar or model summary, ``accelerator="cpu"``, no validation).

What is measured:

* **Step time**: wall time of one optimizer step including the teacher's forward. For the Lightning variants it runs
  from ``on_train_batch_start`` of a timing callback placed *first* in ``callbacks`` (so before the plugin's teacher
  forward) to ``on_train_batch_end`` of a second timing callback placed *last* (so after the plugin's clean-up).
  Lightning calls callback hooks in list order; the order is checked on every fit. For the plain loop the window
  runs from before the teacher forward to after ``optimizer.step()`` (the batch is already fetched).
* **Epoch time**: wall time of a whole training epoch (``on_train_epoch_start`` to ``on_train_epoch_end``, or the
  loop over the ``DataLoader``), which adds data loading and the Lightning loop's own bookkeeping.
* **Peak RSS**: the peak resident set size during one fit, in a separate ``--memory-only VARIANT`` subprocess per
  variant (run one after the other), with its increase over the RSS just before the fit in brackets. On Linux the
  peak is reset just before the fit (``/proc/self/clear_refs``), so data generation does not mask it; elsewhere
  ``ru_maxrss`` is read. Every subprocess imports the same modules, so the figures differ only by what training
  allocates.

The variants are run in rounds (each round one fresh fit of ``--epochs`` epochs per variant; the order is rotated
every round: A B C, B C A, C A B, ...). The first epoch of each round is warm-up and is dropped (unless there is
only one epoch). Reported: the median step time over all kept steps, the median epoch time, and each ratio as the
median over rounds of the within-round ratio of medians. Target: ``plugin`` <= 1.02 x ``lightning``.

Run from the repository root::

    python benchmarks/overhead.py --rounds 20 --epochs 3           # about 1.5 minutes on 2 idle cores
    python benchmarks/overhead.py --quick                          # smoke test, 15-40 s (mostly imports)
    python benchmarks/overhead.py --rounds 5 --epochs 3 --csv overhead.csv --markdown overhead.md
    python benchmarks/overhead.py --rounds 20 --epochs 3 --threads 1 --clock thread   # on a busy machine

Timings on a shared machine vary by 5-10 %; quote the command with the figures and never assert on them. When other
processes compete for the cores, ``--threads 2`` on 2 cores is ruined (every OpenMP barrier waits for a descheduled
thread: steps go from ~4 ms to ~300 ms); the report warns when the load was high. ``--threads 1 --clock thread``
times the main thread's CPU time instead of wall time, which ignores the time the process spends descheduled.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from common import benchmark_trainer, machine_description, maxrss_mb, proc_status_mb, quartiles, quiet, reset_peak_rss
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import DistillationCallback, DistillModule
from lightning_distill.demos import MLPStudent, MNIST1DDataModule, MNIST1DTeacher

Variant = Literal["plain", "lightning", "plugin"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
LABELS: dict[Variant, str] = {
    "plain": "plain PyTorch loop (inline KD)",
    "lightning": "hand-written LightningModule (inline KD)",
    "plugin": "DistillModule + DistillationCallback",
}
TABLE_HEADER = "| variant | median step ms | median epoch s | peak RSS MB (Δ fit) | ratio vs hand-written Lightning |"
TARGET_RATIO = 1.02
ALPHA = 0.9
TEMPERATURE = 4.0
LR = 1e-2


@dataclass(frozen=True)
class Config:
    """Everything that defines one benchmark run."""

    rounds: int
    epochs: int
    threads: int
    batch_size: int
    limit_batches: int | None
    seed: int
    data_seed: int
    clock: Literal["wall", "thread"] = "wall"

    @property
    def timer(self) -> Callable[[], float]:
        """``time.perf_counter`` (wall time) or ``time.thread_time`` (CPU time of the main thread)."""
        return time.thread_time if self.clock == "thread" else time.perf_counter

    def cli_args(self) -> list[str]:
        """The command-line arguments that reproduce this configuration (for the memory subprocesses)."""
        args = ["--epochs", str(self.epochs), "--threads", str(self.threads), "--batch-size", str(self.batch_size)]
        args += ["--seed", str(self.seed), "--data-seed", str(self.data_seed)]
        if self.limit_batches is not None:
            args += ["--limit-batches", str(self.limit_batches)]
        return args


@dataclass
class RunTimes:
    """Per-step and per-epoch wall times (seconds) of one fit."""

    steps: list[list[float]] = field(default_factory=list)  # one list per epoch
    epochs: list[float] = field(default_factory=list)

    def kept(self) -> tuple[list[float], list[float]]:
        """Step and epoch times without the warm-up epoch (kept when the fit has a single epoch)."""
        skip = 1 if len(self.epochs) > 1 else 0
        return [s for epoch in self.steps[skip:] for s in epoch], self.epochs[skip:]


@dataclass(frozen=True)
class Memory:
    """Resident set size of a ``--memory-only`` subprocess, in MB: just before the fit and its peak during the fit."""

    before_fit_mb: float
    peak_mb: float


# ------------------------------------------------------------------------------------------------------ shared pieces
def inline_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinton KD written directly with ``torch.nn.functional``: ``(loss, task_loss, kd_loss)``."""
    kd = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    ce = F.cross_entropy(student_logits, target)
    return alpha * kd + (1.0 - alpha) * ce, ce, kd


def make_dataset(data_seed: int) -> TensorDataset:
    """MNIST-1D's 4000 training samples as in-memory tensors."""
    datamodule = MNIST1DDataModule(data_seed=data_seed)
    datamodule.setup("fit")
    if datamodule.train_set is None:  # setup() always builds it; keeps type checkers honest
        raise RuntimeError("MNIST1DDataModule.setup did not build a training set.")
    return datamodule.train_set


def make_loader(dataset: TensorDataset, config: Config) -> DataLoader[tuple[Tensor, ...]]:
    """The one loader construction every variant uses: shuffled with a fixed generator, no workers."""
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator, num_workers=0)


def make_student(seed: int) -> nn.Module:
    """The MLP student, with the same initial weights for a given seed."""
    torch.manual_seed(seed)
    return MLPStudent(input_dim=40, hidden=256, num_classes=10)


def make_teacher(seed: int) -> nn.Module:
    """The MNIST-1D CNN teacher, frozen and in eval mode (random weights: only its cost matters here)."""
    torch.manual_seed(seed + 1)
    return MNIST1DTeacher(channels=32, num_classes=10, input_length=40).requires_grad_(False).eval()


def make_trainer(config: Config, callbacks: list[L.Callback]) -> L.Trainer:
    """The Trainer both Lightning variants use."""
    limit = config.limit_batches if config.limit_batches is not None else 1.0
    return benchmark_trainer(config.epochs, callbacks, limit_train_batches=limit)


# --------------------------------------------------------------------------------------------------- variant: plain
def fit_plain(teacher: nn.Module, dataset: TensorDataset, config: Config) -> RunTimes:
    """Train with a plain PyTorch loop and inline KD; time every step and epoch."""
    student = make_student(config.seed).train()
    optimizer = torch.optim.Adam(student.parameters(), lr=LR)
    loader = make_loader(dataset, config)
    times = RunTimes()
    clock = config.timer
    for _ in range(config.epochs):
        steps: list[float] = []
        epoch_start = clock()
        for batch_idx, (x, y) in enumerate(loader):
            if config.limit_batches is not None and batch_idx >= config.limit_batches:
                break
            start = clock()
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss, _, _ = inline_kd_loss(student(x), teacher_logits, y, ALPHA, TEMPERATURE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps.append(clock() - start)
        times.epochs.append(clock() - epoch_start)
        times.steps.append(steps)
    return times


# ----------------------------------------------------------------------------------------------- variant: lightning
class HandWrittenKD(L.LightningModule):
    """The LightningModule one would write by hand: teacher as a frozen submodule, inline loss, three logged terms."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> HandWrittenKD:
        """Keep the teacher in eval mode whatever the Trainer asks of the module."""
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        loss, task_loss, kd_loss = inline_kd_loss(self.student(x), teacher_logits, y, ALPHA, TEMPERATURE)
        self.log_dict(
            {"train/loss": loss.detach(), "train/task_loss": task_loss.detach(), "train/kd_loss": kd_loss.detach()},
            batch_size=x.shape[0],
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.student.parameters(), lr=LR)


# ------------------------------------------------------------------------------------------- Lightning step timing
class _Clock:
    """Shared record of the two timing callbacks."""

    def __init__(self, timer: Callable[[], float]) -> None:
        self.timer = timer
        self.times = RunTimes()
        self.step_start = 0.0
        self.epoch_start = 0.0
        self.threads_seen: set[int] = set()


class _StartTimer(L.Callback):
    """Placed first in ``callbacks``: its hooks run before every other callback's (the plugin's teacher forward)."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.threads_seen.add(torch.get_num_threads())
        self.clock.times.steps.append([])
        self.clock.epoch_start = self.clock.timer()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(pl_module, DistillModule) and pl_module.teacher_outputs is not None:
            raise RuntimeError(
                "The timing start callback ran after DistillationCallback: the window misses the teacher"
            )
        self.clock.step_start = self.clock.timer()


class _StopTimer(L.Callback):
    """Placed last in ``callbacks``: its hooks run after every other callback's (the plugin's clean-up)."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.clock.times.steps[-1].append(self.clock.timer() - self.clock.step_start)
        if isinstance(pl_module, DistillModule) and pl_module.teacher_outputs is not None:
            raise RuntimeError("The timing stop callback ran before DistillationCallback's on_train_batch_end.")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.times.epochs.append(self.clock.timer() - self.clock.epoch_start)


def fit_with_timers(
    module: L.LightningModule, extra: list[L.Callback], dataset: TensorDataset, config: Config
) -> RunTimes:
    """Fit ``module`` with the timing callbacks around ``extra`` callbacks and return the times."""
    clock = _Clock(config.timer)
    start, stop = _StartTimer(clock), _StopTimer(clock)
    trainer = make_trainer(config, [start, *extra, stop])
    trainer.fit(module, train_dataloaders=make_loader(dataset, config))
    callbacks: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning at runtime
    order = [callbacks.index(cb) for cb in (start, *extra, stop)]
    if order != sorted(order):
        raise RuntimeError(f"Lightning reordered the callbacks: {callbacks}; the timing window is wrong.")
    if clock.threads_seen != {config.threads}:
        raise RuntimeError(f"torch ran with {clock.threads_seen} threads during the fit, expected {config.threads}.")
    return clock.times


def fit_lightning(teacher: nn.Module, dataset: TensorDataset, config: Config) -> RunTimes:
    """Train the hand-written LightningModule."""
    return fit_with_timers(HandWrittenKD(make_student(config.seed), teacher), [], dataset, config)


def fit_plugin(teacher: nn.Module, dataset: TensorDataset, config: Config) -> RunTimes:
    """Train with DistillModule + DistillationCallback (defaults otherwise: ``check_finite=True``)."""
    module = DistillModule(
        student=make_student(config.seed),
        alpha=ALPHA,
        temperature=TEMPERATURE,
        optimizer=functools.partial(torch.optim.Adam, lr=LR),
    )
    return fit_with_timers(module, [DistillationCallback(teacher)], dataset, config)


FITS: dict[Variant, Callable[[nn.Module, TensorDataset, Config], RunTimes]] = {
    "plain": fit_plain,
    "lightning": fit_lightning,
    "plugin": fit_plugin,
}


# --------------------------------------------------------------------------------------------------------- running
def run_fit(variant: Variant, teacher: nn.Module, dataset: TensorDataset, config: Config) -> RunTimes:
    """One fresh fit of ``variant`` with its own copy of the teacher, after a garbage collection."""
    gc.collect()
    return FITS[variant](copy.deepcopy(teacher), dataset, config)


def run_rounds(config: Config, dataset: TensorDataset, log: Callable[[str], None]) -> list[dict[Variant, RunTimes]]:
    """Run every variant once per round, rotating the order each round."""
    teacher = make_teacher(config.seed)
    rounds: list[dict[Variant, RunTimes]] = []
    for index in range(config.rounds):
        order = VARIANTS[index % len(VARIANTS) :] + VARIANTS[: index % len(VARIANTS)]
        results: dict[Variant, RunTimes] = {}
        for variant in order:
            results[variant] = run_fit(variant, teacher, dataset, config)
        rounds.append(results)
        medians = ", ".join(f"{v} {statistics.median(results[v].kept()[0]) * 1e3:.3f} ms" for v in VARIANTS)
        log(f"round {index + 1}/{config.rounds} ({' '.join(order)}): median step {medians}")
    return rounds


def memory_only(variant: Variant, config: Config) -> Memory:
    """Run one fit of ``variant`` and return the RSS just before it and the peak RSS during it.

    On Linux the peak ("high water mark") is reset to the current RSS just before the fit (``/proc/self/clear_refs``),
    so the peak is that of the fit alone, not of the data generation before it. Elsewhere, or when the reset is not
    allowed, ``ru_maxrss`` is read before and after instead (the increase then reads 0 when the fit stays below the
    earlier peak).
    """
    dataset = make_dataset(config.data_seed)
    teacher = make_teacher(config.seed)
    gc.collect()
    reset = reset_peak_rss()
    before = proc_status_mb("VmRSS") if reset else maxrss_mb()
    run_fit(variant, teacher, dataset, config)
    return Memory(before_fit_mb=before, peak_mb=proc_status_mb("VmHWM") if reset else maxrss_mb())


def measure_memory(config: Config) -> dict[Variant, Memory]:
    """Run ``--memory-only`` for every variant in its own subprocess, one after the other.

    Not concurrently: several multi-threaded processes on few cores slow each other down many-fold.
    """
    script = Path(__file__).resolve()
    memory: dict[Variant, Memory] = {}
    for variant in VARIANTS:
        proc = subprocess.run(
            [sys.executable, str(script), "--memory-only", variant, *config.cli_args()],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"--memory-only {variant} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
        memory[variant] = Memory(**json.loads(proc.stdout.strip().splitlines()[-1]))
    return memory


# --------------------------------------------------------------------------------------------------------- report
PAIRS: tuple[tuple[Variant, Variant], ...] = (("plugin", "lightning"), ("plugin", "plain"), ("lightning", "plain"))


def round_ratios(rounds: Sequence[dict[Variant, RunTimes]], num: Variant, den: Variant, part: int) -> list[float]:
    """Per-round ratio of medians ``num / den``; ``part`` 0 = step times, 1 = epoch times."""
    return [statistics.median(r[num].kept()[part]) / statistics.median(r[den].kept()[part]) for r in rounds]


def best_round_ratio(rounds: Sequence[dict[Variant, RunTimes]], num: Variant, den: Variant) -> float:
    """Ratio of the two variants' fastest rounds (by median step time): noise on a shared machine only adds time."""
    best = {v: min(statistics.median(r[v].kept()[0]) for r in rounds) for v in (num, den)}
    return best[num] / best[den]


def run_description(config: Config) -> list[str]:
    """The clock and the run's size, one markdown bullet each."""
    clock = "time.thread_time (main-thread CPU time)" if config.clock == "thread" else "time.perf_counter"
    return [
        f"- clock: {clock}",
        f"- {config.rounds} round(s) x {config.epochs} epoch(s), batch {config.batch_size}, "
        f"limit_batches {config.limit_batches}, seed {config.seed}, data_seed {config.data_seed}",
    ]


def report(
    config: Config,
    rounds: Sequence[dict[Variant, RunTimes]],
    memory: dict[Variant, Memory] | None,
    command: str,
    load_at_start: float | None,
) -> tuple[str, list[dict[str, Any]]]:
    """Build the markdown report and the CSV rows."""
    lines = [
        f"## lightning-distill overhead: `{command}`",
        "",
        *machine_description(config.threads, load_at_start),
        *run_description(config),
        "",
    ]
    lines += [TABLE_HEADER, "|---|---:|---:|---:|---:|"]
    rows: list[dict[str, Any]] = []
    for variant in VARIANTS:
        steps = [s * 1e3 for r in rounds for s in r[variant].kept()[0]]
        p25, median, p75 = quartiles(steps)  # the middle quartile is the median
        mem = memory[variant] if memory else None
        row: dict[str, Any] = {
            "variant": variant,
            "median_step_ms": median,
            "step_p25_ms": p25,
            "step_p75_ms": p75,
            "steps": len(steps),
            "median_epoch_s": statistics.median(e for r in rounds for e in r[variant].kept()[1]),
            "peak_rss_mb": mem.peak_mb if mem else "",
            "fit_rss_increase_mb": mem.peak_mb - mem.before_fit_mb if mem else "",
            "step_ratio_vs_lightning": statistics.median(round_ratios(rounds, variant, "lightning", 0)),
            "epoch_ratio_vs_lightning": statistics.median(round_ratios(rounds, variant, "lightning", 1)),
        }
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        mem_text = f"{mem.peak_mb:.0f} (+{mem.peak_mb - mem.before_fit_mb:.0f})" if mem else "n/a"
        lines.append(
            f"| {LABELS[variant]} | {row['median_step_ms']:.3f} [{p25:.3f}-{p75:.3f}] | {row['median_epoch_s']:.3f} "
            f"| {mem_text} | {row['step_ratio_vs_lightning']:.3f} (epoch {row['epoch_ratio_vs_lightning']:.3f}) |"
        )
    lines += ["", "Step ms: median [p25-p75] over kept steps. Ratios: median over rounds of per-round ratios.", ""]
    lines += [
        "| ratio | step | step, best rounds | epoch | per-round step ratios: min / p25 / p75 / max |",
        "|---|---:|---:|---:|---|",
    ]
    for num, den in PAIRS:
        ratios = round_ratios(rounds, num, den, 0)
        spread = " / ".join(f"{x:.3f}" for x in (min(ratios), *quartiles(ratios)[::2], max(ratios)))
        lines.append(
            f"| {num} / {den} | {statistics.median(ratios):.3f} | {best_round_ratio(rounds, num, den):.3f} "
            f"| {statistics.median(round_ratios(rounds, num, den, 1)):.3f} | {spread} |"
        )
    lines.append("")
    lines.append(
        "Best rounds: ratio of each variant's fastest round (median step), since noise only adds time. "
        "Timings vary by 5-10 % between runs on a shared machine; compare ratios, not absolute figures."
    )
    target = statistics.median(round_ratios(rounds, "plugin", "lightning", 0))
    verdict = "met" if target <= TARGET_RATIO else "NOT met"
    lines += ["", f"Target plugin / hand-written Lightning step time <= {TARGET_RATIO}: {verdict} ({target:.3f})."]
    return "\n".join(lines) + "\n", rows


# ------------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (one fit per variant each)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit; the first is warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and shuffling seed")
    parser.add_argument("--data-seed", type=int, default=42, help="MNIST-1D data seed")
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall: time.perf_counter; thread: time.thread_time, the main thread's CPU time, which ignores time spent "
        "descheduled on a busy machine (needs --threads 1: other threads' work is not counted)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 epoch, 10 batches")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report as markdown")
    parser.add_argument("--memory-only", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.limit_batches = 1, 1, 10
    for name in ("rounds", "epochs", "threads", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.clock == "thread" and args.threads != 1:
        parser.error(f"--clock thread needs --threads 1 (it counts the main thread only), got --threads {args.threads}")
    if args.limit_batches is not None and args.limit_batches < 1:
        parser.error(f"--limit-batches must be >= 1, got {args.limit_batches}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    torch.set_num_threads(config.threads)
    quiet()
    if args.memory_only is not None:
        print(json.dumps(dataclasses.asdict(memory_only(args.memory_only, config))))
        return 0

    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    dataset = make_dataset(config.data_seed)
    started = time.perf_counter()
    log = functools.partial(print, file=sys.stderr, flush=True)
    rounds = run_rounds(config, dataset, log)
    log(f"timing rounds took {time.perf_counter() - started:.1f} s")
    peaks = None if args.no_memory else measure_memory(config)
    text, rows = report(config, rounds, peaks, command.strip(), load_at_start)
    print(text, end="")
    if args.markdown is not None:
        args.markdown.write_text(text)
    if args.csv is not None:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
