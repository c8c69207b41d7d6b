"""Helpers shared by the benchmark scripts: machine description, peak memory, quartiles, a bar chart."""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

if TYPE_CHECKING:  # matplotlib is imported only by the scripts' plot functions, when --plot is given
    from matplotlib.axes import Axes


def machine_description(threads: int, load_at_start: float | None) -> list[str]:
    """CPU, versions, threads and the load before the run, one markdown bullet each (with a warning when busy)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = "n/a" if load_at_start is None else f"{load_at_start:.2f}"
    lines = [
        f"- CPU: {cpu} ({os.cpu_count()} logical cores), 1-min load average before the run {load}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}",
        f"- torch threads {torch.get_num_threads()} (--threads {threads}), "
        f"interop threads {torch.get_num_interop_threads()}",
    ]
    if load_at_start is not None and load_at_start + threads > (os.cpu_count() or 1) + 0.5:
        lines.append(
            f"- WARNING: the machine was busy (load {load_at_start:.2f} on {os.cpu_count()} cores): with several "
            "threads every OpenMP barrier can wait for a descheduled thread and steps slow down many-fold. "
            "HINT: rerun when the machine is idle, or with --threads 1."
        )
    return lines


def quartiles(values: Sequence[float]) -> list[float]:
    """``[p25, p50, p75]`` (the value itself three times for a single value)."""
    return statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    """``"mean ± std"`` of ``values`` with ``digits`` decimals; only the mean for a single value."""
    mean = f"{statistics.mean(values):.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def bar_panel(
    ax: Axes, values: Mapping[str, Sequence[float]], ylabel: str, title: str, digits: int = 1, zoom: bool = False
) -> None:
    """One bar per label: mean ± std, each value (seed, round) as a dot beside the error bar, the mean on top.

    The y axis starts at 0, or with ``zoom`` spans only the values (for accuracies a few points apart; never below 0
    for values that are not).
    """
    data = list(values.values())
    means = [statistics.mean(v) for v in data]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in data]
    tops = [max(m + s, *v) for m, s, v in zip(means, stds, data, strict=True)]
    low = min(min(m - s, *v) for m, s, v in zip(means, stds, data, strict=True))
    colors = [f"C{i}" for i in range(len(data))]
    error = stds if any(stds) else None
    ax.bar(range(len(data)), means, yerr=error, capsize=4, color=colors, alpha=0.5, edgecolor=colors)
    for i, (v, mean, top) in enumerate(zip(data, means, tops, strict=True)):
        if len(v) > 1:
            ax.scatter([i + 0.12 + 0.24 * j / (len(v) - 1) for j in range(len(v))], v, color="black", s=10, zorder=3)
        ax.annotate(f"{mean:.{digits}f}", (i, top), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    high = max(tops)
    if zoom:
        span = (high - low) or abs(high) or 1.0
        bottom = low - 0.3 * span
        ax.set_ylim(bottom if low < 0 else max(bottom, 0.0), high + 0.2 * span)
    else:
        ax.set_ylim(min(low, 0.0), high * 1.15 if high > 0 else 1.0)
    ax.set_xticks(range(len(values)), [textwrap.fill(label, 16) for label in values], fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, imported only when a plot is asked for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> str:
    """Lay ``fig`` out, save it as a PNG at ``path`` (creating its folder), close it; return the report's line."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return f"Plot: `{path}` ({path.stat().st_size / 1e3:.0f} KB)."


@dataclass(frozen=True)
class Memory:
    """Resident set size of a ``--memory-only`` subprocess, in MB: just before the fit and its peak during the fit."""

    before_fit_mb: float
    peak_mb: float


def memory_subprocess(args: Sequence[str]) -> Memory:
    """Run ``python *args`` (a script's ``--memory-only`` mode, whose last stdout line is a ``Memory`` as JSON)."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[1:3])} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    return Memory(**json.loads(proc.stdout.strip().splitlines()[-1]))


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); ``False`` when that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        proc_status_mb("VmHWM")
    except (OSError, ValueError):
        return False
    return True


def proc_status_mb(key: str) -> float:
    """A ``kB`` entry of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 2**10
    raise ValueError(f"/proc/self/status has no {key!r} entry.")


def maxrss_mb() -> float:
    """Peak resident set size of this process in MB (``ru_maxrss`` is in KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def quiet() -> None:
    """Silence Lightning's info lines and the warnings that are expected here."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    # eval mode: the frozen teacher inside the hand-written module; validation_step: DistillModule defines one
    for pattern in (
        "does not have many workers",
        "looks untrained",
        "LeafSpec",
        r"module\(s\) in eval mode",
        "`validation_step` but have no `val_dataloader`",
        "smaller than the logging interval",  # short smoke runs
    ):
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")


def benchmark_trainer(
    max_epochs: int,
    callbacks: list[L.Callback],
    limit_train_batches: int | float = 1.0,
    strategy: Any = "auto",
    devices: int = 1,
    logger: Logger | bool = False,
    log_every_n_steps: int = 50,
    max_steps: int = -1,
) -> L.Trainer:
    """A CPU Trainer with nothing but training: no checkpoints, progress bar, summary or validation (no logger)."""
    return L.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator="cpu",
        strategy=strategy,
        devices=devices,
        logger=logger,
        log_every_n_steps=log_every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=limit_train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


@dataclass(frozen=True)
class Run:
    """What every benchmark's ``main`` sets up first: its command line, the load, a progress log and a clock."""

    command: str
    load_at_start: float | None
    log: Callable[..., None]
    started: float

    def finish(self, lines: list[str], markdown: Path | None) -> int:
        """Append the wall time and the load, print the report, also write it to ``markdown``; return 0."""
        load_at_end = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"
        elapsed = time.perf_counter() - self.started
        lines = [*lines, f"Total wall time {elapsed:.0f} s; 1-min load average at the end {load_at_end}."]
        text = "\n".join(lines) + "\n"
        print(text, end="")
        if markdown is not None:
            markdown.write_text(text)
        return 0


def start_run(script: str, argv: Sequence[str] | None, threads: int) -> Run:
    """Set torch's thread count, silence expected noise, and record the command and the machine's load."""
    torch.set_num_threads(threads)
    quiet()
    args = sys.argv[1:] if argv is None else argv
    return Run(
        command=f"python benchmarks/{script} {' '.join(args)}".strip(),
        load_at_start=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        log=functools.partial(print, file=sys.stderr, flush=True),
        started=time.perf_counter(),
    )


# ------------------------------------------------------------------------------------------- Lightning step timing
@dataclass
class RunTimes:
    """Per-step and per-epoch times (seconds) of one fit."""

    steps: list[list[float]] = field(default_factory=list)  # one list per epoch
    epochs: list[float] = field(default_factory=list)

    def kept(self) -> tuple[list[float], list[float]]:
        """Step and epoch times without the warm-up epoch (kept when the fit has a single epoch)."""
        skip = 1 if len(self.epochs) > 1 else 0
        return [s for epoch in self.steps[skip:] for s in epoch], self.epochs[skip:]


class StepClock:
    """Times every step and epoch of a Lightning fit through two callbacks placed around the others.

    ``around(callbacks)`` returns ``[start, *callbacks, stop]``: Lightning calls callback hooks in list order, so the
    window of a step runs from ``on_train_batch_start`` before every other callback's (the plugin's teacher forward)
    to ``on_train_batch_end`` after every other callback's (the plugin's clean-up); ``checked`` verifies that order
    and the thread count after the fit. Both callbacks declare ``reads_train_metrics = False``: they read no logged
    metrics, so the plugin may skip ``self.log`` on steps nobody reads, as it does without them.
    """

    def __init__(self, timer: Callable[[], float]) -> None:
        self.timer = timer
        self.times = RunTimes()
        self.step_start = 0.0
        self.epoch_start = 0.0
        self.threads_seen: set[int] = set()

    def around(self, callbacks: Sequence[L.Callback]) -> list[L.Callback]:
        """The callbacks to give the Trainer: the start timer, ``callbacks``, the stop timer."""
        return [_StartTimer(self), *callbacks, _StopTimer(self)]

    def checked(self, trainer: L.Trainer, timed: Sequence[L.Callback], threads: int) -> RunTimes:
        """The times of the fit, after checking the callbacks kept their order and torch its thread count."""
        present: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning at runtime
        order = [present.index(cb) for cb in timed]
        if order != sorted(order):
            raise RuntimeError(f"Lightning reordered the callbacks: {present}; the timing window is wrong.")
        if self.threads_seen != {threads}:
            raise RuntimeError(f"torch ran with {self.threads_seen} threads during the fit, expected {threads}.")
        return self.times


def _teacher_outputs(pl_module: L.LightningModule) -> object:
    return getattr(pl_module, "teacher_outputs", None)


class _StartTimer(L.Callback):
    """Placed first in ``callbacks``: its hooks run before every other callback's."""

    reads_train_metrics = False  # a measuring instrument: nothing needs logging for it

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.threads_seen.add(torch.get_num_threads())
        self.clock.times.steps.append([])
        self.clock.epoch_start = self.clock.timer()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if _teacher_outputs(pl_module) is not None:
            raise RuntimeError(
                "The timing start callback ran after DistillationCallback: the window misses the teacher"
            )
        self.clock.step_start = self.clock.timer()


class _StopTimer(L.Callback):
    """Placed last in ``callbacks``: its hooks run after every other callback's."""

    reads_train_metrics = False

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.clock.times.steps[-1].append(self.clock.timer() - self.clock.step_start)
        if _teacher_outputs(pl_module) is not None:
            raise RuntimeError("The timing stop callback ran before DistillationCallback's on_train_batch_end.")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.times.epochs.append(self.clock.timer() - self.clock.epoch_start)
