"""The end-to-end demo: teacher → student alone vs distilled on MNIST-1D, same recipe and seeds.

Run it with ``lightning-distill demo`` (about 3½ minutes on two CPU cores). It trains a 1-D CNN teacher, then for
each seed an MLP student alone (``alpha=0``) and the same MLP distilled from the teacher, both with the same
optimizer, schedule, epochs, data order and initial weights. It reports each run as it starts and ends on stderr
(``run 3/11 distilled seed 0 … 73.3 % in 17.5 s``), prints a table of test accuracy (mean ± std over seeds) and wall
time, and writes ``results.csv``, ``summary.csv``, ``results.png``, the teacher checkpoint and the logs of every run
(CSV, and TensorBoard when it is installed) to the output folder; its last line is the plot's path.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from lightning_distill._quiet import quiet_lightning
from lightning_distill.callback import DistillationCallback
from lightning_distill.demos.loggers import logged_trainer, read_metric, where_logs_are
from lightning_distill.demos.mnist1d import MNIST1DDataModule
from lightning_distill.demos.models import MLPStudent, MNIST1DTeacher
from lightning_distill.module import DistillModule

__all__ = ["DemoConfig", "RunResult", "main", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; the defaults are the documented run.

    Attributes:
        output: Folder for the checkpoint, tables, plot and logs.
        seeds: Number of student seeds (0, 1, ...).
        teacher_epochs: Epochs of teacher training.
        student_epochs: Epochs of each student run (alone and distilled alike).
        hidden: Width of the MLP student.
        alpha: Weight of the KD term.
        temperature: KD temperature.
        data_seed: MNIST-1D generation seed.
        num_train: Optional training subset (for a quick run).
        threads: ``torch.set_num_threads`` for the run. The models are tiny: one thread is about as fast as
            several and, unlike several, is not slowed many-fold when another process competes for the cores.
        tensorboard: Also log to TensorBoard: ``None`` when it is installed, ``True`` always, ``False`` never.
        quick: A smoke run (``--quick``): its teacher is barely trained on purpose, so the callback's untrained-teacher
            warning is expected and not shown, and the accuracies say nothing about distillation.
    """

    output: Path = Path("demo_output")
    seeds: int = 5
    teacher_epochs: int = 30
    student_epochs: int = 30
    hidden: int = 256
    alpha: float = 0.9
    temperature: float = 4.0
    data_seed: int = 42
    num_train: int | None = None
    threads: int = 1
    tensorboard: bool | None = None
    quick: bool = False


@dataclass(frozen=True)
class RunResult:
    """One trained model's outcome; ``logs`` says where its logs are (:func:`where_logs_are`)."""

    model: str
    seed: int
    test_acc: float
    fit_seconds: float
    logs: str = ""


def _trainer(config: DemoConfig, name: str, epochs: int, callbacks: list[L.Callback]) -> L.Trainer:
    log_every_n_steps = 1 if config.quick else 10  # a quick epoch has 4 batches, a full one 40
    return logged_trainer(
        config.output / "logs",
        name,
        epochs,
        callbacks,
        tensorboard=config.tensorboard,
        log_every_n_steps=log_every_n_steps,
    )


def _fit_and_test(
    config: DemoConfig,
    run: tuple[int, int],
    name: str,
    seed: int,
    module: DistillModule,
    epochs: int,
    callbacks: list[L.Callback],
) -> tuple[RunResult, L.Trainer]:
    index, total = run
    label = "teacher" if name == "teacher" else f"{name} seed {seed}"
    print(f"run {index}/{total} {label} …", end="", file=sys.stderr, flush=True)
    datamodule = MNIST1DDataModule(data_seed=config.data_seed, num_train=config.num_train)
    trainer = _trainer(config, f"{name}_seed{seed}", epochs, callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    accuracy = float(metrics["test/acc"])
    print(f" {100 * accuracy:.1f} % in {seconds:.1f} s", file=sys.stderr, flush=True)
    return RunResult(name, seed, accuracy, seconds, where_logs_are(trainer.loggers)), trainer


@contextlib.contextmanager
def _demo_warnings() -> Iterator[None]:
    """Hide the warnings the demo expects; every other warning still shows.

    MNIST-1D sits in memory, where ``num_workers=0`` loads fastest: Lightning's advice to add workers (on machines
    with more than two cores) is for data read from disk.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        yield


def _student(config: DemoConfig, seed: int, alpha: float) -> DistillModule:
    L.seed_everything(seed, verbose=False)  # same initial weights and data order for both students of a seed
    return DistillModule(
        student=MLPStudent(hidden=config.hidden),
        alpha=alpha,
        temperature=config.temperature,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=config.student_epochs),
    )


def run_demo(config: DemoConfig) -> list[RunResult]:
    """Train the teacher and the students; write the teacher checkpoint; return one result per trained model.

    Each run is reported on stderr as it starts and ends (``run 2/11 student_alone seed 0 … 68.8 % in 9.8 s``).
    """
    with quiet_lightning(), _demo_warnings():  # one progress line per run instead of Lightning's banners
        return _run_demo(config)


def _run_demo(config: DemoConfig) -> list[RunResult]:
    config.output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    L.seed_everything(0, verbose=False)
    teacher_module = DistillModule(
        student=MNIST1DTeacher(),
        alpha=0.0,
        optimizer=functools.partial(torch.optim.Adam, lr=5e-3),
    )
    total = 1 + 2 * config.seeds
    teacher_result, trainer = _fit_and_test(config, (1, total), "teacher", 0, teacher_module, config.teacher_epochs, [])
    trainer.save_checkpoint(config.output / "teacher.ckpt", weights_only=False)  # a full, resumable checkpoint
    teacher = teacher_module.export_student()
    results = [teacher_result]
    for seed in range(config.seeds):
        alone = _student(config, seed, alpha=0.0)
        run = (2 + 2 * seed, total)
        results.append(_fit_and_test(config, run, "student_alone", seed, alone, config.student_epochs, [])[0])
        distilled = _student(config, seed, alpha=config.alpha)
        callback = DistillationCallback(teacher, check_accuracy=not config.quick)  # a smoke run's teacher is weak
        run = (3 + 2 * seed, total)
        results.append(_fit_and_test(config, run, "distilled", seed, distilled, config.student_epochs, [callback])[0])
    return results


def _summarize(results: Sequence[RunResult]) -> list[dict[str, str]]:
    """One row per model: accuracy mean ± std over seeds and mean fit time."""
    rows = []
    for model in dict.fromkeys(r.model for r in results):
        accs = [r.test_acc for r in results if r.model == model]
        seconds = [r.fit_seconds for r in results if r.model == model]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(
            {
                "model": model,
                "runs": str(len(accs)),
                "test_acc": f"{100 * statistics.mean(accs):.1f} ± {100 * std:.1f} %",
                "fit_seconds": f"{statistics.mean(seconds):.1f}",
            }
        )
    return rows


def _markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """Render summary rows as a markdown table."""
    header = "| model | runs | test accuracy (mean ± std) | fit time (s, mean) |\n|---|---|---|---|"
    lines = [f"| {r['model']} | {r['runs']} | {r['test_acc']} | {r['fit_seconds']} |" for r in rows]
    return "\n".join([header, *lines])


def _write_outputs(config: DemoConfig, results: Sequence[RunResult]) -> None:
    """Write ``results.csv`` (every run), ``summary.csv`` and ``results.png`` to the output folder."""
    with open(config.output / "results.csv", "w", newline="") as f:
        rows_writer = csv.writer(f)
        rows_writer.writerow(["model", "seed", "test_acc", "fit_seconds"])
        rows_writer.writerows([r.model, r.seed, f"{r.test_acc:.4f}", f"{r.fit_seconds:.2f}"] for r in results)
    rows = _summarize(results)
    with open(config.output / "summary.csv", "w", newline="") as f:
        summary_writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        summary_writer.writeheader()
        summary_writer.writerows(rows)
    _plot(config, results)


def _plot(config: DemoConfig, results: Sequence[RunResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    for i, model in enumerate(models):
        accs = [100 * r.test_acc for r in results if r.model == model]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        bars.bar(i, statistics.mean(accs), yerr=std, capsize=6, color=f"C{i}")
        bars.annotate(f"{statistics.mean(accs):.1f}", (i, statistics.mean(accs) + std + 1), ha="center", va="bottom")
        bars.scatter([i] * len(accs), accs, color="black", s=12, zorder=3)
    bars.set_xticks(range(len(models)), models)
    bars.set_ylabel("test accuracy (%)")
    bars.set_ylim(0, 105)
    bars.set_title("MNIST-1D: test accuracy (bars: mean ± std over seeds)")
    for i, model in enumerate(models):
        seeds = [r.seed for r in results if r.model == model]
        runs = [[acc for _, acc in read_metric(config.output / "logs" / f"{model}_seed{s}", "val/acc")] for s in seeds]
        for j, curve in enumerate(runs):
            label = model if j == 0 else None
            curves.plot(range(1, len(curve) + 1), [100 * a for a in curve], color=f"C{i}", alpha=0.8, label=label)
    curves.set_xlabel("epoch")
    curves.set_ylabel("held-out accuracy (%)")
    curves.set_title("learning curves (one line per seed)")
    curves.legend()
    fig.tight_layout()
    fig.savefig(config.output / "results.png", dpi=120)
    plt.close(fig)


def _parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """Parse ``lightning-distill demo`` arguments into a :class:`DemoConfig`."""
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(prog="lightning-distill demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=defaults.output, help="output folder (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=defaults.seeds, help="student seeds (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=defaults.teacher_epochs)
    parser.add_argument("--student-epochs", type=int, default=defaults.student_epochs)
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="MLP student width")
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (default: %(default)s)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of seconds (400 samples, 2 epochs): checks, not results"
    )
    parser.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also log to TensorBoard (default: when it is installed)",
    )
    args = parser.parse_args(argv)
    for name in ("seeds", "teacher_epochs", "student_epochs", "hidden", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.quick:
        return DemoConfig(
            args.output,
            2,
            2,
            2,
            32,
            args.alpha,
            args.temperature,
            num_train=400,
            threads=args.threads,
            tensorboard=args.tensorboard,
            quick=True,
        )
    return DemoConfig(
        args.output,
        args.seeds,
        args.teacher_epochs,
        args.student_epochs,
        args.hidden,
        args.alpha,
        args.temperature,
        threads=args.threads,
        tensorboard=args.tensorboard,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-distill demo``."""
    config = _parse_args(argv)
    if config.quick:
        print(
            "Smoke run (--quick): 400 training samples, 2 epochs per model, a teacher trained just enough to run. "
            "It checks that everything works; its accuracies say nothing about distillation (drop --quick for that).",
            flush=True,
        )
    start = time.perf_counter()
    results = run_demo(config)
    _write_outputs(config, results)
    print(_markdown_table(_summarize(results)))
    print(f"\nTotal wall time {time.perf_counter() - start:.0f} s. Tables, checkpoint and logs in {config.output}/")
    first_distilled = next(r for r in results if r.model == "distilled")
    print(f"Logs of the first distilled run:\n{first_distilled.logs}")
    print(f"Plot: {config.output / 'results.png'}")
