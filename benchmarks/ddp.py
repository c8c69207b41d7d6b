"""DDP on CPU: training throughput of 2 processes against 1, with the teacher replicated per process.

What is measured: a compute-bound distillation fit (teacher MLP 64 -> 2048 -> 2048 -> 10, frozen; student MLP
64 -> 1024 -> 1024 -> 10; ``DistillModule(alpha=0.9, T=4)`` + ``DistillationCallback``; synthetic data, batch 256
per process, Adam) run as ``Trainer(strategy="ddp", accelerator="cpu", devices=N)`` with **one torch thread per
process**, N = 1 and 2, each in a fresh ``python`` process (Lightning relaunches this script for rank 1). Time is
taken on rank 0 from the start of epoch 2 to the end of the last epoch (epoch 1 is warm-up, process start and the
gloo rendezvous are excluded); throughput = samples processed by **all** ranks / that time. Rounds alternate the
order of N = 1 and N = 2; the report gives the median throughput of each and the median of the per-round ratios
(target: >= 1.6x with 2 processes). Each round also measures the machine's own ceiling: how much faster two
independent single-thread processes doing 1024x1024 matmuls finish their work together than one alone (on a VM whose
cores share physical resources this is well below 2).

Run from the repository root::

    python benchmarks/ddp.py                 # 5 rounds, ~3 min on 2 cores
    python benchmarks/ddp.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from common import benchmark_trainer, machine_description, start_run
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import DistillationCallback, DistillModule

FEATURES, CLASSES, BATCH = 64, 10, 256


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, CLASSES)
    )


class EpochTimer(L.Callback):
    """Rank 0 records the wall time of every epoch after the first and the samples all ranks processed in them."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0
        self.samples = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= 1:
            self.seconds += time.perf_counter() - self.start
            self.samples += trainer.num_training_batches * BATCH * trainer.world_size


def timed_fit(
    strategy: Any, devices: int, callback: DistillationCallback, module: DistillModule, epochs: int, samples: int
) -> tuple[L.Trainer, float]:
    """Fit ``module`` on synthetic data with one thread per process; return the Trainer and samples/s (epochs >= 2)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(samples, FEATURES)
    y = (x[:, :CLASSES]).argmax(-1)
    timer = EpochTimer()
    trainer = benchmark_trainer(epochs, [callback, timer], strategy=strategy, devices=devices)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True))
    return trainer, timer.samples / timer.seconds


def fit(devices: int, epochs: int, samples: int, out: Path) -> None:
    """One fit on ``devices`` CPU processes; rank 0 writes ``{"samples_per_s": ...}`` to ``out``."""
    torch.manual_seed(0)
    callback, module = DistillationCallback(mlp(2048)), DistillModule(student=mlp(1024), alpha=0.9, temperature=4.0)
    trainer, rate = timed_fit("ddp", devices, callback, module, epochs, samples)
    if trainer.global_rank == 0:
        out.write_text(json.dumps({"samples_per_s": rate}))


def run_child(script: str, fit_arg: str, args: argparse.Namespace) -> dict[str, float]:
    """Run ``script --fit fit_arg`` in a fresh process (Lightning relaunches it per rank); return rank 0's JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, script, "--fit", fit_arg, "--epochs", str(args.epochs)]
        command += ["--samples", str(args.samples), "--out", str(out)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"The fit `--fit {fit_arg}` failed:\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())


_MATMULS = (
    "import time, torch; torch.set_num_threads(1); a = torch.randn(1024, 1024); a @ a; t = time.perf_counter(); "
    "[a @ a for _ in range(100)]; print(time.perf_counter() - t)"
)


def hardware_ceiling() -> float:
    """Throughput ratio of 2 independent single-thread matmul processes over 1: what 2 ranks could ever reach here."""
    alone = float(subprocess.run([sys.executable, "-c", _MATMULS], capture_output=True, text=True).stdout)
    pair = [subprocess.Popen([sys.executable, "-c", _MATMULS], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    together = max(float(process.communicate()[0]) for process in pair)
    return 2 * alone / together


def parse_args(
    argv: Sequence[str] | None, description: str, rounds: int, fit: type | Sequence[str]
) -> argparse.Namespace:
    """The options both multi-process benchmarks take; ``fit`` is the hidden ``--fit`` type or its choices."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit; the first is warm-up")
    parser.add_argument("--samples", type=int, default=16384, help="training samples (split across ranks)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 epochs, 2048 samples")
    kind = {"type": fit} if isinstance(fit, type) else {"choices": list(fit)}
    parser.add_argument("--fit", default=None, help=argparse.SUPPRESS, **kind)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.samples = 1, 2, 2048
    if args.rounds < 1 or args.epochs < 2 or args.samples < 2 * BATCH:
        parser.error("need --rounds >= 1, --epochs >= 2 and --samples >= 512")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, __doc__, rounds=5, fit=int)
    if args.fit is not None:  # a child process (and, for rank 1, Lightning's relaunch of it)
        fit(args.fit, args.epochs, args.samples, args.out)
        return 0
    run = start_run("ddp.py", argv, threads=1)
    rates: dict[int, list[float]] = {1: [], 2: []}
    ratios, ceilings = [], []
    for index in range(args.rounds):
        ceilings.append(hardware_ceiling())
        order = (1, 2) if index % 2 == 0 else (2, 1)
        for devices in order:
            rates[devices].append(run_child(__file__, str(devices), args)["samples_per_s"])
        ratios.append(rates[2][-1] / rates[1][-1])
        run.log(f"round {index + 1}/{args.rounds}: 1 process {rates[1][-1]:.0f}/s, 2 processes {rates[2][-1]:.0f}/s")
    ratio = statistics.median(ratios)
    lines = [
        f"## DDP on CPU: `{run.command}`",
        "",
        *machine_description(1, run.load_at_start),
        "",
        "| processes (1 thread each) | median samples/s | ratio vs 1 process |",
        "|---|---:|---:|",
        f"| 1 | {statistics.median(rates[1]):.0f} | 1.00 |",
        f"| 2 (`ddp`, gloo) | {statistics.median(rates[2]):.0f} | {ratio:.2f} |",
        f"| 2 independent matmul processes (no DDP): the machine's ceiling | | {statistics.median(ceilings):.2f} |",
        "",
        f"{args.rounds} round(s), {args.epochs} epochs per fit (first dropped), {args.samples} samples, batch {BATCH} "
        f"per process; per-round ratios {', '.join(f'{r:.2f}' for r in ratios)}.",
        "",
        f"Target >= 1.6x with 2 processes: {'met' if ratio >= 1.6 else 'NOT met'} ({ratio:.2f}x).",
    ]
    return run.finish(lines, None)


if __name__ == "__main__":
    sys.exit(main())
