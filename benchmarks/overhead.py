"""What lightning-distill costs per step against writing it by hand: three figures, side by side in one run.

Every variant below is trained once per round, in a rotated order (A B C ..., B C ... A, ...), in one process:

(a) **Plugin vs hand-written KD** (MLP student). ``plain``: a plain PyTorch loop with the KD loss inline;
    ``lightning``: a hand-written ``LightningModule`` holding the frozen teacher, the same inline loss, logging the
    same three terms (``train/loss``, ``train/task_loss``, ``train/kd_loss``) with ``self.log_dict`` every step, as
    one writes it; ``plugin``: ``DistillModule`` + ``DistillationCallback``. Figure: plugin / lightning step time.
(b) **A full teacher cache vs the student alone** (MLP student). ``alone``: a plain ``LightningModule`` training
    the student with cross-entropy, logging ``train/loss`` every step (what a user would); ``cached``: the plugin
    with ``DistillationCallback(teacher, cache=TeacherCache(dir))`` over ``IndexedDataset`` (a fresh cache per fit:
    epoch 1 fills it, every later epoch reads it). Figure: cached / alone **epoch** time over epochs >= 2 (data
    loading and the cache's reads included).
(c) **One feature map vs none** (the 8-channel CNN student of ``features.py``, so the map gets a 1x1-convolution
    projector 8 -> 32). ``fm0``: the plugin with logit KD; ``fm1``: the same plus
    ``FeatureMap("features.act1", "features.act1", loss="mse", weight=0.1)``; ``hand_fm0`` / ``hand_fm1``: the
    hand-written ``LightningModule`` of (a) with this student, and the same plus the map written by hand (forward
    hooks on both models, a conv1x1 projector, inline losses, four terms logged every step). Figures: fm1 / fm0
    step time, and for reference hand_fm1 / hand_fm0 (what the map's own arithmetic costs) and fm1 / hand_fm1.

Setup: MNIST-1D (4000 x 40, ``data_seed`` 42, normalised, in memory), batch 100, ``DataLoader(num_workers=0,
shuffle=True)`` with a fixed ``torch.Generator``; teacher = MNIST-1D 1-D CNN (3 x conv32 + linear), random weights,
frozen and in eval mode (its values do not matter for timing); students = MLP 40-256-256-10 or the 8-channel CNN,
the same initial weights in every variant of a group; loss = alpha * T^2 * KL(p_t || p_s) (batchmean) + (1 - alpha)
* CE with alpha = 0.9, T = 4; Adam, lr 1e-2; ``torch.set_num_threads(--threads)``. Every Lightning variant uses the
same ``Trainer``: a ``CSVLogger`` in a temporary folder with Lightning's default ``log_every_n_steps=50`` (``--logger
none`` for ``logger=False``), no checkpointing, progress bar or model summary, ``accelerator="cpu"``, no validation.

What is measured:

* **Step time**: one optimizer step including the teacher's forward. For the Lightning variants it runs from
  ``on_train_batch_start`` of a timing callback placed *first* in ``callbacks`` (so before the plugin's teacher
  forward) to ``on_train_batch_end`` of a second timing callback placed *last* (so after the plugin's clean-up);
  the order is checked on every fit. Both declare ``reads_train_metrics = False`` (they read no logged metrics, so
  the plugin may skip ``self.log`` on steps nobody reads, as it does without them). For the plain loop the window
  runs from before the teacher forward to after ``optimizer.step()``.
* **Epoch time**: a whole training epoch (``on_train_epoch_start`` to ``on_train_epoch_end``, or the loop over the
  ``DataLoader``), which adds data loading and the Lightning loop's own bookkeeping.
* **Peak RSS** (group (a) only): the peak resident set size during one fit, in a separate ``--memory-only VARIANT``
  subprocess per variant, with its increase over the RSS just before the fit in brackets (on Linux the peak is
  reset just before the fit through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss`` is read).

The first epoch of each fit is warm-up (and for ``cached`` the epoch that fills the cache) and is dropped. Reported:
median step and epoch times over all kept steps and epochs, and each ratio as the median over rounds of the
within-round ratio of medians, with its spread over rounds.

Run from the repository root::

    python benchmarks/overhead.py --rounds 20 --clock thread       # the README's figures, ~7 min on 2 cores
    python benchmarks/overhead.py --quick                          # smoke test, about a minute
    python benchmarks/overhead.py --groups a --rounds 10           # only the plugin vs hand-written figure

Timings on a shared machine vary by 5-10 %; quote the command with the figures and never assert on them. When other
processes compete for the cores, ``--threads 2`` on 2 cores is ruined (every OpenMP barrier waits for a descheduled
thread); ``--threads 1 --clock thread`` times the main thread's CPU time, which ignores time spent descheduled.
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
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from common import (
    Memory,
    RunTimes,
    StepClock,
    benchmark_trainer,
    machine_description,
    maxrss_mb,
    memory_subprocess,
    proc_status_mb,
    quartiles,
    quiet,
    reset_peak_rss,
)
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_distill import DistillationCallback, DistillModule, FeatureMap, TeacherCache
from lightning_distill.demos import MLPStudent, MNIST1DDataModule, MNIST1DTeacher
from lightning_distill.teacher import IndexedDataset

Variant = Literal["plain", "lightning", "plugin", "alone", "cached", "fm0", "fm1", "hand_fm0", "hand_fm1"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
GROUPS: dict[str, tuple[Variant, ...]] = {
    "a": ("plain", "lightning", "plugin"),
    "b": ("alone", "cached"),
    "c": ("fm0", "fm1", "hand_fm0", "hand_fm1"),
}
LABELS: dict[Variant, str] = {
    "plain": "plain PyTorch loop (inline KD)",
    "lightning": "hand-written LightningModule (inline KD)",
    "plugin": "DistillModule + DistillationCallback",
    "alone": "student alone (plain LightningModule, CE)",
    "cached": "plugin, full TeacherCache (epochs >= 2 read it)",
    "fm0": "CNN student: plugin, logit KD",
    "fm1": "CNN student: plugin, logit KD + 1 feature map",
    "hand_fm0": "CNN student: hand-written, logit KD",
    "hand_fm1": "CNN student: hand-written, logit KD + 1 feature map",
}
MEMORY_VARIANTS: tuple[Variant, ...] = GROUPS["a"]
ALPHA = 0.9
TEMPERATURE = 4.0
LR = 1e-2
FM_WEIGHT = 0.1
FM_LAYER = "features.act1"


@dataclass(frozen=True)
class Figure:
    """One headline ratio: ``num / den`` of step (``part`` 0) or epoch (``part`` 1) times, and its target."""

    label: str
    num: Variant
    den: Variant
    part: int
    target: float | None
    goal: float | None = None


FIGURES = (
    Figure("(a) plugin / hand-written Lightning KD, step", "plugin", "lightning", 0, 1.00, 0.90),
    Figure("(b) full teacher cache / student alone, epoch", "cached", "alone", 1, 1.10),
    Figure("(c) 1 feature map / no feature map (plugin), step", "fm1", "fm0", 0, 1.10),
    Figure("(c) 1 feature map / no feature map (hand-written), step", "hand_fm1", "hand_fm0", 0, None),
    Figure("(c) plugin / hand-written, 1 feature map, step", "fm1", "hand_fm1", 0, None),
)


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
    logger: Literal["csv", "none"] = "csv"
    log_every_n_steps: int = 50

    @property
    def timer(self) -> Callable[[], float]:
        """``time.perf_counter`` (wall time) or ``time.thread_time`` (CPU time of the main thread)."""
        return time.thread_time if self.clock == "thread" else time.perf_counter

    def cli_args(self) -> list[str]:
        """The command-line arguments that reproduce this configuration (for the memory subprocesses)."""
        args = ["--epochs", str(self.epochs), "--threads", str(self.threads), "--batch-size", str(self.batch_size)]
        args += ["--seed", str(self.seed), "--data-seed", str(self.data_seed), "--logger", self.logger]
        args += ["--log-every-n-steps", str(self.log_every_n_steps)]
        if self.limit_batches is not None:
            args += ["--limit-batches", str(self.limit_batches)]
        return args


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


def make_loader(dataset: Dataset[Any], config: Config) -> DataLoader[Any]:
    """The one loader construction every variant uses: shuffled with a fixed generator, no workers."""
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator, num_workers=0)


def make_student(seed: int, cnn: bool = False) -> nn.Module:
    """The MLP student (or the 8-channel CNN of group (c)), with the same initial weights for a given seed."""
    torch.manual_seed(seed)
    return MNIST1DTeacher(channels=8) if cnn else MLPStudent(input_dim=40, hidden=256, num_classes=10)


def make_teacher(seed: int) -> nn.Module:
    """The MNIST-1D CNN teacher, frozen and in eval mode (random weights: only its cost matters here)."""
    torch.manual_seed(seed + 1)
    return MNIST1DTeacher(channels=32, num_classes=10, input_length=40).requires_grad_(False).eval()


@contextmanager
def make_trainer(config: Config, callbacks: list[L.Callback]) -> Iterator[L.Trainer]:
    """The Trainer every Lightning variant uses (its CSV logs in a temporary folder, removed afterwards)."""
    limit = config.limit_batches if config.limit_batches is not None else 1.0
    with tempfile.TemporaryDirectory() as logs:
        logger = CSVLogger(logs, name="overhead") if config.logger == "csv" else False
        yield benchmark_trainer(
            config.epochs,
            callbacks,
            limit_train_batches=limit,
            logger=logger,
            log_every_n_steps=config.log_every_n_steps,
        )


def adam(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=LR)


# ------------------------------------------------------------------------------------------ the hand-written modules
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
        return adam(self.student.parameters())


class StudentAlone(L.LightningModule):
    """The plain LightningModule training the student alone: cross-entropy, ``train/loss`` logged every step."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.student(x), y)
        self.log("train/loss", loss.detach(), batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam(self.student.parameters())


class HandWrittenFeatureKD(HandWrittenKD):
    """Logit KD plus one FitNets map written by hand: forward hooks on both models, a conv1x1 projector, MSE."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__(student, teacher)
        self.projector = nn.Conv1d(8, 32, kernel_size=1)
        self.captured: dict[str, Tensor] = {}
        for name, model in (("student", student), ("teacher", teacher)):
            model.get_submodule(FM_LAYER).register_forward_hook(functools.partial(self._keep, name))

    def _keep(self, name: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.captured[name] = output

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        loss, task_loss, kd_loss = inline_kd_loss(self.student(x), teacher_logits, y, ALPHA, TEMPERATURE)
        feature_loss = F.mse_loss(self.projector(self.captured.pop("student")), self.captured.pop("teacher"))
        loss = loss + FM_WEIGHT * feature_loss
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/task_loss": task_loss.detach(),
                "train/kd_loss": kd_loss.detach(),
                f"train/feature_loss/{FM_LAYER}": feature_loss.detach(),
            },
            batch_size=x.shape[0],
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam([*self.student.parameters(), *self.projector.parameters()])


def plugin_module(student: nn.Module, maps: Sequence[FeatureMap] = ()) -> DistillModule:
    return DistillModule(student=student, alpha=ALPHA, temperature=TEMPERATURE, feature_maps=maps, optimizer=adam)


def fit_with_timers(
    module: L.LightningModule, extra: list[L.Callback], dataset: Dataset[Any], config: Config
) -> RunTimes:
    """Fit ``module`` with the timing callbacks around ``extra`` callbacks and return the times."""
    clock = StepClock(config.timer)
    timed = clock.around(extra)
    with make_trainer(config, timed) as trainer:
        trainer.fit(module, train_dataloaders=make_loader(dataset, config))
    return clock.checked(trainer, timed, config.threads)


# --------------------------------------------------------------------------------------------------------- variants
def fit_plain(teacher: nn.Module, dataset: TensorDataset, config: Config) -> RunTimes:
    """Train with a plain PyTorch loop and inline KD; time every step and epoch."""
    student = make_student(config.seed).train()
    optimizer = adam(student.parameters())
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


def fit_cached(teacher: nn.Module, dataset: TensorDataset, config: Config) -> RunTimes:
    """The plugin with a fresh full-logits ``TeacherCache``: epoch 1 fills it, the later epochs read it."""
    with tempfile.TemporaryDirectory() as folder:
        cache = TeacherCache(Path(folder) / "cache")
        callback = DistillationCallback(teacher, cache=cache)
        times = fit_with_timers(plugin_module(make_student(config.seed)), [callback], IndexedDataset(dataset), config)
    if config.limit_batches is None and cache.teacher_runs > len(times.steps[0]):  # partial epochs: never full
        raise RuntimeError(f"The teacher ran {cache.teacher_runs} times: the cache was not read after epoch 1.")
    return times


def fit_feature(teacher: nn.Module, dataset: TensorDataset, config: Config, maps: int) -> RunTimes:
    """The plugin with the CNN student and logit KD, with ``maps`` (0 or 1) FitNets maps on ``features.act1``."""
    fmaps = [FeatureMap(student=FM_LAYER, teacher=FM_LAYER, loss="mse", weight=FM_WEIGHT)][:maps]
    module = plugin_module(make_student(config.seed, cnn=True), fmaps)
    return fit_with_timers(module, [DistillationCallback(teacher)], dataset, config)


FITS: dict[Variant, Callable[[nn.Module, TensorDataset, Config], RunTimes]] = {
    "plain": fit_plain,
    "lightning": lambda t, d, c: fit_with_timers(HandWrittenKD(make_student(c.seed), t), [], d, c),
    "plugin": lambda t, d, c: fit_with_timers(plugin_module(make_student(c.seed)), [DistillationCallback(t)], d, c),
    "alone": lambda t, d, c: fit_with_timers(StudentAlone(make_student(c.seed)), [], d, c),
    "cached": fit_cached,
    "fm0": functools.partial(fit_feature, maps=0),
    "fm1": functools.partial(fit_feature, maps=1),
    "hand_fm0": lambda t, d, c: fit_with_timers(HandWrittenKD(make_student(c.seed, cnn=True), t), [], d, c),
    "hand_fm1": lambda t, d, c: fit_with_timers(HandWrittenFeatureKD(make_student(c.seed, cnn=True), t), [], d, c),
}


# --------------------------------------------------------------------------------------------------------- running
def run_fit(variant: Variant, teacher: nn.Module, dataset: TensorDataset, config: Config) -> RunTimes:
    """One fresh fit of ``variant`` with its own copy of the teacher, after a garbage collection."""
    gc.collect()
    return FITS[variant](copy.deepcopy(teacher), dataset, config)


def run_rounds(
    config: Config, variants: Sequence[Variant], dataset: TensorDataset, log: Callable[[str], None]
) -> list[dict[Variant, RunTimes]]:
    """Run every variant once per round, rotating the order each round."""
    teacher = make_teacher(config.seed)
    rounds: list[dict[Variant, RunTimes]] = []
    for index in range(config.rounds):
        shift = index % len(variants)
        order = [*variants[shift:], *variants[:shift]]
        results = {variant: run_fit(variant, teacher, dataset, config) for variant in order}
        rounds.append(results)
        medians = ", ".join(f"{v} {statistics.median(results[v].kept()[0]) * 1e3:.2f}" for v in variants)
        log(f"round {index + 1}/{config.rounds} ({' '.join(order)}): median step ms {medians}")
    return rounds


def memory_only(variant: Variant, config: Config) -> Memory:
    """Run one fit of ``variant`` and return the RSS just before it and the peak RSS during it."""
    dataset = make_dataset(config.data_seed)
    teacher = make_teacher(config.seed)
    gc.collect()
    reset = reset_peak_rss()
    before = proc_status_mb("VmRSS") if reset else maxrss_mb()
    run_fit(variant, teacher, dataset, config)
    return Memory(before_fit_mb=before, peak_mb=proc_status_mb("VmHWM") if reset else maxrss_mb())


def measure_memory(config: Config, variants: Sequence[Variant]) -> dict[Variant, Memory]:
    """Run ``--memory-only`` for each variant in its own subprocess, one after the other (never concurrently)."""
    script = Path(__file__).resolve()
    return {v: memory_subprocess([str(script), "--memory-only", v, *config.cli_args()]) for v in variants}


# --------------------------------------------------------------------------------------------------------- report
PAIRS: tuple[tuple[Variant, Variant], ...] = (("plugin", "lightning"), ("plugin", "plain"), ("lightning", "plain"))


def round_ratios(rounds: Sequence[dict[Variant, RunTimes]], num: Variant, den: Variant, part: int) -> list[float]:
    """Per-round ratio of medians ``num / den``; ``part`` 0 = step times, 1 = epoch times."""
    return [statistics.median(r[num].kept()[part]) / statistics.median(r[den].kept()[part]) for r in rounds]


def best_round_ratio(rounds: Sequence[dict[Variant, RunTimes]], num: Variant, den: Variant, part: int = 0) -> float:
    """Ratio of the two variants' fastest rounds (by median time): noise on a shared machine only adds time."""
    best = {v: min(statistics.median(r[v].kept()[part]) for r in rounds) for v in (num, den)}
    return best[num] / best[den]


def figure_rows(rounds: Sequence[dict[Variant, RunTimes]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The headline table: each figure whose two variants ran, with its spread over rounds and its target."""
    lines = [
        "| figure | ratio | per-round p25-p75 | best rounds | target | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    rows: list[dict[str, Any]] = []
    for fig in FIGURES:
        if fig.num not in rounds[0] or fig.den not in rounds[0]:
            continue
        ratios = round_ratios(rounds, fig.num, fig.den, fig.part)
        p25, median, p75 = quartiles(ratios)
        target = "" if fig.target is None else f"<= {fig.target:.2f}" + (f" (goal {fig.goal:.2f})" if fig.goal else "")
        verdict = "" if fig.target is None else ("met" if median <= fig.target else "NOT met")
        if fig.goal is not None and median <= fig.goal:
            verdict = "met, goal too"
        best = best_round_ratio(rounds, fig.num, fig.den, fig.part)
        lines.append(f"| {fig.label} | **{median:.3f}** | {p25:.3f}-{p75:.3f} | {best:.3f} | {target} | {verdict} |")
        rows.append({"figure": fig.label, "ratio": round(median, 4), "p25": round(p25, 4), "p75": round(p75, 4)})
    return lines, rows


def run_description(config: Config, variants: Sequence[Variant]) -> list[str]:
    """The clock, the logger and the run's size, one markdown bullet each."""
    clock = "time.thread_time (main-thread CPU time)" if config.clock == "thread" else "time.perf_counter"
    logger = f"CSVLogger, log_every_n_steps {config.log_every_n_steps}" if config.logger == "csv" else "logger=False"
    return [
        f"- clock: {clock}; Lightning variants: {logger}",
        f"- {config.rounds} round(s) x {config.epochs} epoch(s) of {len(variants)} variants, batch "
        f"{config.batch_size}, limit_batches {config.limit_batches}, seed {config.seed}, data_seed {config.data_seed}",
    ]


def report(
    config: Config,
    rounds: Sequence[dict[Variant, RunTimes]],
    memory: dict[Variant, Memory] | None,
    command: str,
    load_at_start: float | None,
) -> tuple[str, list[dict[str, Any]]]:
    """Build the markdown report and the CSV rows (one per variant, then one per figure)."""
    variants = [v for v in VARIANTS if v in rounds[0]]
    figures, figure_csv = figure_rows(rounds)
    lines = [
        f"## lightning-distill overhead: `{command}`",
        "",
        *machine_description(config.threads, load_at_start),
        *run_description(config, variants),
        "",
        *figures,
        "",
        "Ratio: median over rounds of the per-round ratio of medians (steps, or epochs >= 2 for (b)).",
        "",
        "| variant | median step ms [p25-p75] | median epoch s | peak RSS MB (Δ fit) |",
        "|---|---:|---:|---:|",
    ]
    rows: list[dict[str, Any]] = []
    for variant in variants:
        steps = [s * 1e3 for r in rounds for s in r[variant].kept()[0]]
        p25, median, p75 = quartiles(steps)
        epoch = statistics.median(e for r in rounds for e in r[variant].kept()[1])
        mem = memory.get(variant) if memory else None
        mem_text = f"{mem.peak_mb:.0f} (+{mem.peak_mb - mem.before_fit_mb:.0f})" if mem else "n/a"
        lines.append(f"| {LABELS[variant]} | {median:.3f} [{p25:.3f}-{p75:.3f}] | {epoch:.3f} | {mem_text} |")
        row: dict[str, Any] = {"variant": variant, "median_step_ms": median, "step_p25_ms": p25}
        row.update(step_p75_ms=p75, steps=len(steps), median_epoch_s=epoch, peak_rss_mb=mem.peak_mb if mem else "")
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    if all(v in variants for v in GROUPS["a"]):
        lines += [
            "",
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
    lines += [
        "",
        "Best rounds: ratio of each variant's fastest round (median), since noise only adds time. Timings vary by "
        "5-10 % between runs on a shared machine; compare ratios, not absolute figures.",
    ]
    return "\n".join(lines) + "\n", rows + figure_csv


# ------------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--groups", nargs="+", choices=sorted(GROUPS), default=sorted(GROUPS), help="figures to run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (one fit per variant each)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit; the first is warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and shuffling seed")
    parser.add_argument("--data-seed", type=int, default=42, help="MNIST-1D data seed")
    parser.add_argument("--logger", choices=("csv", "none"), default="csv", help="the Lightning variants' logger")
    parser.add_argument("--log-every-n-steps", type=int, default=50, help="Trainer(log_every_n_steps=)")
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall: time.perf_counter; thread: time.thread_time, the main thread's CPU time, which ignores time spent "
        "descheduled on a busy machine (needs --threads 1: other threads' work is not counted)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 epochs of 5 batches, RSS of plugin")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report as markdown")
    parser.add_argument("--memory-only", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.limit_batches = 1, 2, 5
    for name in ("rounds", "epochs", "threads", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.clock == "thread" and args.threads != 1:
        parser.error(f"--clock thread needs --threads 1 (it counts the main thread only), got --threads {args.threads}")
    if args.limit_batches is not None and args.limit_batches < 1:
        parser.error(f"--limit-batches must be >= 1, got {args.limit_batches}")
    if args.log_every_n_steps < 0:
        parser.error(f"--log-every-n-steps must be >= 0, got {args.log_every_n_steps}")
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
    variants = [v for v in VARIANTS if any(v in GROUPS[g] for g in args.groups)]
    dataset = make_dataset(config.data_seed)
    started = time.perf_counter()
    log = functools.partial(print, file=sys.stderr, flush=True)
    rounds = run_rounds(config, variants, dataset, log)
    log(f"timing rounds took {time.perf_counter() - started:.1f} s")
    memory_variants = [v for v in MEMORY_VARIANTS if v in variants and (v == "plugin" or not args.quick)]
    peaks = None if args.no_memory or not memory_variants else measure_memory(config, memory_variants)
    text, rows = report(config, rounds, peaks, command.strip(), load_at_start)
    print(text, end="")
    if args.markdown is not None:
        args.markdown.write_text(text)
    if args.csv is not None:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=sorted({key for row in rows for key in row}))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
