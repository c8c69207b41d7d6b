"""What lightning-distill costs per step against writing it by hand: three figures, side by side in one run.

The variants themselves (models, hand-written modules, one fit function each) are in ``overhead_variants.py``; this
file runs them in rounds and reports. Every variant below is trained once per round, in a rotated order
(A B C ..., B C ... A, ...), in one process:

(a) **Plugin vs hand-written KD** (MLP student). ``plain``: a plain PyTorch loop with the KD loss inline;
    ``lightning``: a hand-written ``LightningModule`` holding the frozen teacher, the same inline loss, logging the
    same three terms (``train/loss``, ``train/task_loss``, ``train/kd_loss``) with ``self.log_dict`` every step, as
    one writes it; ``plugin``: ``DistillModule`` + ``DistillationCallback``. Figure: plugin / lightning step time.
(b) **A full teacher cache vs the student alone** (MLP student). ``alone``: a plain ``LightningModule`` training
    the student with cross-entropy, logging ``train/loss`` every step (what a user would); ``cached``: the plugin
    with ``DistillationCallback(teacher, cache=TeacherCache(dir))`` over ``IndexedDataset`` (a fresh cache per fit:
    epoch 1 fills it, every later epoch reads it); ``hand_cached``: a hand-written ``LightningModule`` reading the
    teacher's logits, computed once before the fit into a float16 table, by the ``IndexedDataset`` batch's indices,
    with (a)'s inline loss and three logged terms (what one would write instead of a cache). Figure: cached / alone
    **epoch** time over epochs >= 2 (data loading and the cache's reads included), and for reference hand_cached /
    alone and cached / hand_cached.
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

    python benchmarks/overhead.py --rounds 30 --epochs 4 --clock thread   # the README's figures, ~8 min on 2 cores
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    Memory,
    RunTimes,
    machine_description,
    maxrss_mb,
    memory_subprocess,
    proc_status_mb,
    quartiles,
    quiet,
    reset_peak_rss,
)
from overhead_variants import (
    FITS,
    GROUPS,
    LABELS,
    MEMORY_VARIANTS,
    VARIANTS,
    Config,
    Variant,
    make_dataset,
    make_teacher,
)
from torch import nn
from torch.utils.data import TensorDataset


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
    Figure("(b) hand-written cache / student alone, epoch", "hand_cached", "alone", 1, None),
    Figure("(b) plugin cache / hand-written cache, epoch", "cached", "hand_cached", 1, None),
    Figure("(c) 1 feature map / no feature map (plugin), step", "fm1", "fm0", 0, 1.10),
    Figure("(c) 1 feature map / no feature map (hand-written), step", "hand_fm1", "hand_fm0", 0, None),
    Figure("(c) plugin / hand-written, 1 feature map, step", "fm1", "hand_fm1", 0, None),
)


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
