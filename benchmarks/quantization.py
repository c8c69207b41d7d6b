"""Quantization-aware distillation on MNIST-1D: the MNN recipe, QAT alone vs QAT + KD, int8 size and CPU latency.

What is measured: a float teacher (``MNIST1DTeacher``, 32 channels, 30 epochs, Adam 5e-3, batch 100) is distilled
into its own fake-quantized copy (``quantization_aware(copy of the teacher, bits=B)``, the MNN recipe: same
architecture, initialized from the teacher) for ``--epochs`` epochs (Adam 1e-3, observers frozen for the last two),
either with cross-entropy only ("QAT alone", ``alpha=0``) or with KD (``alpha=0.9, temperature=20,
divergence="reverse_kl"``), for B = 8 and 4 bits and ``--seeds`` seeds. Test accuracy is on the 1000 MNIST-1D test
samples, of the exported int8 model (``export_quantized``). Size: ``model_bytes`` of the float model and the int8
one. Latency: median time of a forward pass at batch 1 and batch 1000, float vs int8, one torch thread.

Run from the repository root::

    python benchmarks/quantization.py            # ~3 min on 2 cores
    python benchmarks/quantization.py --quick    # smoke run

``--plot PATH`` also draws the accuracy per variant and the latency float vs int8 to a PNG.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from cache import accuracy, data
from common import bar_panel, benchmark_trainer, machine_description, mean_std, pyplot, save_figure, start_run
from torch.utils.data import DataLoader

from lightning_distill import DistillationCallback, DistillModule
from lightning_distill.demos import MNIST1DTeacher
from lightning_distill.quantization import FreezeQuantization, export_quantized, model_bytes, quantization_aware


def train_float(train: torch.utils.data.Dataset, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = MNIST1DTeacher()
    module = DistillModule(student=teacher, alpha=0.0, optimizer=functools.partial(torch.optim.Adam, lr=5e-3))
    benchmark_trainer(epochs, []).fit(module, DataLoader(train, batch_size=100, shuffle=True))
    return teacher.eval()


def qat(teacher: torch.nn.Module, train, bits: int, kd: bool, epochs: int, seed: int) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    student = quantization_aware(copy.deepcopy(teacher), bits=bits)
    module = DistillModule(
        student=student,
        alpha=0.9 if kd else 0.0,
        temperature=20.0,
        divergence="reverse_kl",
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
    )
    callbacks = [FreezeQuantization(observers_after=max(epochs - 2, 1), batchnorm_after=max(epochs - 2, 1))]
    if kd:
        callbacks.append(DistillationCallback(teacher))
    loader = DataLoader(train, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(seed))
    benchmark_trainer(epochs, callbacks).fit(module, loader)
    return export_quantized(student)


def latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def plot(
    float_acc: float, results: Mapping[tuple[int, bool], list[float]], latency: Mapping[str, list[float]], path: Path
) -> str:
    """Left: test accuracy per variant; middle and right: latency float vs int8 at batch 1 and batch 1000."""
    plt = pyplot()

    fig, (left, *right) = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    accs = {"float": [float_acc]}
    for bits in (8, 4):
        accs |= {f"{bits}-bit QAT alone": results[(bits, False)], f"{bits}-bit QAT + KD": results[(bits, True)]}
    bar_panel(left, accs, "test acc (%)", "Test accuracy, exported (mean ± std; dots: seeds)", zoom=True)
    left.axhline(float_acc - 1.0, color="grey", linestyle="--", linewidth=1, label="float - 1 pt (int8 target)")
    left.legend(fontsize=8)
    for index, (ax, batch) in enumerate(zip(right, (1, 1000), strict=True)):
        times = {name: [ms[index]] for name, ms in latency.items()}
        bar_panel(ax, times, "latency (ms, median)", f"Latency, batch {batch}", digits=3 if batch == 1 else 2)
    return save_figure(fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=200, help="latency repetitions")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, teacher 2 epochs")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the results to this PNG")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs, args.repeats = 1, 1, 2, 10
    if args.seeds < 1 or args.epochs < 1 or args.teacher_epochs < 1:
        parser.error("need --seeds, --epochs and --teacher-epochs >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = start_run("quantization.py", argv, threads=1)
    train, x_test, y_test = data()
    teacher = train_float(train, args.teacher_epochs)
    float_acc = 100 * accuracy(teacher, x_test, y_test)
    run.log(f"float teacher {float_acc:.1f} %")
    results: dict[tuple[int, bool], list[float]] = {}
    int8_model = None
    for bits in (8, 4):
        for seed in range(args.seeds):
            for kd in (False, True) if seed % 2 == 0 else (True, False):
                exported = qat(teacher, train, bits, kd, args.epochs, seed)
                results.setdefault((bits, kd), []).append(100 * accuracy(exported, x_test, y_test))
                run.log(f"{bits}-bit seed {seed} {'QAT + KD' if kd else 'QAT alone'}: {results[(bits, kd)][-1]:.1f} %")
                if bits == 8 and kd:
                    int8_model = exported
    assert int8_model is not None

    rows = [f"| float teacher (the recipe's float model) | {float_acc:.1f} | | |"]
    for bits in (8, 4):
        alone, kd = results[(bits, False)], results[(bits, True)]
        gain = statistics.mean(kd) - statistics.mean(alone)
        rows.append(f"| {bits}-bit, QAT alone (CE) | {mean_std(alone)} | | |")
        rows.append(
            f"| {bits}-bit, QAT + KD (alpha 0.9, T 20, reverse KL) | {mean_std(kd)} | {gain:+.1f} | "
            f"{statistics.mean(kd) - float_acc:+.1f} |"
        )
    models = {"float32": teacher, "int8 (8-bit QAT + KD, exported)": int8_model}
    latency = {  # batch 1, batch 1000
        name: [latency_ms(model, x_test[:1], args.repeats), latency_ms(model, x_test, max(args.repeats // 10, 3))]
        for name, model in models.items()
    }
    latency_rows = [
        f"| {name} | {model_bytes(model) / 1024:.1f} | {latency[name][0]:.3f} | {latency[name][1]:.2f} |"
        for name, model in models.items()
    ]
    gap = statistics.mean(results[(8, True)]) - float_acc
    lines = [
        f"## Quantization-aware distillation on MNIST-1D: `{run.command}`",
        "",
        *machine_description(1, run.load_at_start),
        "",
        "| model | test acc % (mean ± std, exported) | KD gain (pts) | vs float (pts) |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        "| model | weights KiB | latency ms, batch 1 (median) | latency ms, batch 1000 (median) |",
        "|---|---:|---:|---:|",
        *latency_rows,
        "",
        f"{args.seeds} seed(s), {args.epochs} QAT epochs, teacher {args.teacher_epochs} epochs. Target: the int8 "
        f"student within 1 pt of the float model: {'met' if gap >= -1.0 else 'NOT met'} ({gap:+.1f} pts).",
    ]
    if args.plot is not None:
        lines.append(plot(float_acc, results, latency, args.plot))
    return run.finish(lines, None)


if __name__ == "__main__":
    sys.exit(main())
