"""Teacher cache on MNIST-1D: step time from epoch 2 on, bytes per sample, and accuracy, cached vs uncached.

What is measured: a wide 1-D CNN teacher (``MNIST1DTeacher(channels=128)``, trained first) distilled into an MLP
student (``MLPStudent(hidden=256)``; alpha 0.5, T 4, Adam 1e-2, batch 100, 4000 training samples, one torch thread).
Four variants per seed, run in a rotated order: the student alone (no teacher), uncached KD, KD with a full-logits
``TeacherCache`` and with a top-3 cache (each cache starts empty, so epoch 1 fills it). Step time is the wall time of
every epoch after the first divided by its batches (median over those epochs); the report gives medians over seeds
and the median per-seed ratio to the student alone (the cache's <= 1.10x target is measured by ``overhead.py``, figure
(b), against a plain LightningModule). Test accuracy is on the 1000 MNIST-1D test samples after the last epoch.

Run from the repository root::

    python benchmarks/cache.py             # 3 seeds, 20 epochs, ~4 min on 2 cores
    python benchmarks/cache.py --quick     # smoke run

``--plot PATH`` also draws the step time and the test accuracy per variant to a PNG.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from common import bar_panel, benchmark_trainer, machine_description, mean_std, pyplot, save_figure, start_run
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import DistillationCallback, DistillModule, TeacherCache
from lightning_distill.demos import MLPStudent, MNIST1DTeacher
from lightning_distill.demos.mnist1d import _generate
from lightning_distill.teacher import IndexedDataset

VARIANTS = ("student alone", "uncached KD", "cached KD (full logits)", "cached KD (top-3)")
BATCH = 100


class EpochTimes(L.Callback):
    def __init__(self) -> None:
        self.per_step: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= 1:
            self.per_step.append((time.perf_counter() - self.start) / trainer.num_training_batches)


def data() -> tuple[TensorDataset, torch.Tensor, torch.Tensor]:
    x, y, x_test, y_test = _generate(42)
    train = TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long))
    return train, torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test, dtype=torch.long)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train_teacher(train: TensorDataset, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = MNIST1DTeacher(channels=128)
    module = DistillModule(student=teacher, alpha=0.0, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    loader = DataLoader(train, batch_size=BATCH, shuffle=True)
    benchmark_trainer(max_epochs=epochs, callbacks=[]).fit(module, loader)
    return teacher.eval()


def fit(
    variant: str, seed: int, teacher: torch.nn.Module, train: TensorDataset, epochs: int, tmp: Path
) -> dict[str, Any]:
    torch.manual_seed(seed)
    student = MLPStudent(hidden=256)
    alpha = 0.0 if variant == "student alone" else 0.5
    module = DistillModule(
        student=student, alpha=alpha, temperature=4.0, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)
    )
    timer = EpochTimes()
    callbacks: list[L.Callback] = [timer]
    cache = None
    if variant != "student alone":
        if variant.startswith("cached"):
            cache = TeacherCache(tmp / f"{seed}-{variant[11:15]}", top_k=3 if "top" in variant else None)
        callbacks.append(DistillationCallback(teacher, cache=cache))
    loader = DataLoader(
        IndexedDataset(train), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    benchmark_trainer(max_epochs=epochs, callbacks=callbacks).fit(module, loader)
    return {
        "step_ms": 1e3 * statistics.median(timer.per_step),
        "student": student,
        "bytes": cache.bytes_per_sample() if cache is not None else None,
    }


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> str:
    """Left: step time per variant (and the 1.10x target); right: test accuracy per variant."""
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = {variant: [r["step_ms"] for r in results[variant]] for variant in VARIANTS}
    bar_panel(left, steps, "ms per step (epochs >= 2)", "Step time (mean ± std; dots: seeds)", digits=2)
    target = 1.10 * statistics.median(steps["student alone"])
    left.axhline(target, color="grey", linestyle="--", linewidth=1, label="1.10x alone (cache target)")
    left.legend(fontsize=8, loc="upper left")
    accs = {variant: [100 * r["acc"] for r in results[variant]] for variant in VARIANTS}
    bar_panel(right, accs, "test acc (%)", "Test accuracy (mean ± std; dots: seeds)", zoom=True)
    return save_figure(fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs, teacher 1 epoch")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the results to this PNG")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs = 1, 2, 1
    if args.seeds < 1 or args.epochs < 2 or args.teacher_epochs < 1:
        parser.error("need --seeds >= 1, --epochs >= 2, --teacher-epochs >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = start_run("cache.py", argv, threads=1)
    train, x_test, y_test = data()
    teacher = train_teacher(train, args.teacher_epochs)
    teacher_acc = accuracy(teacher, x_test, y_test)
    run.log(f"teacher test accuracy {teacher_acc:.3f}")
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            order = VARIANTS[seed % 4 :] + VARIANTS[: seed % 4]
            for variant in order:
                result = fit(variant, seed, teacher, train, args.epochs, Path(tmp))
                result["acc"] = accuracy(result.pop("student"), x_test, y_test)
                results[variant].append(result)
                run.log(f"seed {seed} {variant}: {result['step_ms']:.2f} ms/step, acc {result['acc']:.3f}")
    alone = [r["step_ms"] for r in results["student alone"]]
    rows = []
    for variant in VARIANTS:
        steps = [r["step_ms"] for r in results[variant]]
        ratio = statistics.median(s / a for s, a in zip(steps, alone, strict=True))
        accs = [100 * r["acc"] for r in results[variant]]
        stored = results[variant][0]["bytes"]
        rows.append(
            f"| {variant} | {statistics.median(steps):.2f} | {ratio:.2f} | {mean_std(accs)} | "
            f"{stored if stored is not None else '—'} |"
        )
    cached = [r["step_ms"] / a for r, a in zip(results["cached KD (full logits)"], alone, strict=True)]
    lines = [
        f"## Teacher cache on MNIST-1D: `{run.command}`",
        "",
        *machine_description(1, run.load_at_start),
        "",
        f"Teacher `MNIST1DTeacher(channels=128)`: test accuracy {100 * teacher_acc:.1f} %.",
        "",
        "| variant | median step ms (epochs >= 2) | ratio vs alone | test acc % (mean ± std) | bytes per sample |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"{args.seeds} seed(s), {args.epochs} epochs. Full-logits cache vs alone: {statistics.median(cached):.2f}x "
        "(wall clock, `DistillModule(alpha=0)` as the student alone; the <= 1.10x target is measured against a plain "
        "LightningModule in main-thread CPU time by `overhead.py`, figure (b)).",
    ]
    if args.plot is not None:
        lines.append(plot(results, args.plot))
    return run.finish(lines, None)


if __name__ == "__main__":
    sys.exit(main())
