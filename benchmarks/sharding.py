"""FSDP2 on CPU: the teacher sharded across 2 processes against a full replica per process.

What is measured: the fit of ``benchmarks/ddp.py`` (teacher MLP 64 -> 2048 -> 2048 -> 10, 4.3 M frozen parameters;
student MLP 64 -> 1024 -> 1024 -> 10) under Lightning's ``ModelParallelStrategy`` with 2 CPU processes (gloo), one torch
thread each. The student's layers and the module are sharded by ``configure_model``; the teacher is held as
``DistillationCallback(TeacherRunner(teacher, sharding=...))`` says: ``"replicate"`` or ``"shard"`` (each Linear its own
unit, ``shard_units=[nn.Linear]``). For each: the teacher bytes each rank holds at rest
(``DistillationCallback.teacher_bytes``) and the training throughput from epoch 2 on (samples of both ranks / wall time
on rank 0). Rounds alternate the order; the report gives medians and the median per-round ratio shard / replicate.

Run from the repository root::

    python benchmarks/sharding.py            # 3 rounds, ~3 min on 2 cores
    python benchmarks/sharding.py --quick    # smoke run
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from common import machine_description, start_run
from ddp import BATCH, mlp, parse_args, run_child, timed_fit
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_distill import DistillationCallback, DistillModule, TeacherRunner

MODES = ("replicate", "shard")


class ShardedStudent(DistillModule):
    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.student:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def fit(mode: str, epochs: int, samples: int, out: Path) -> None:
    """One 2-process fit; rank 0 writes throughput and teacher bytes per rank to ``out``."""
    torch.manual_seed(0)
    callback = DistillationCallback(TeacherRunner(mlp(2048), sharding=mode, shard_units=[nn.Linear]))
    module = ShardedStudent(student=mlp(1024), alpha=0.9, temperature=4.0)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer, rate = timed_fit(strategy, 2, callback, module, epochs, samples)
    if trainer.global_rank == 0:
        out.write_text(json.dumps({"samples_per_s": rate, "teacher_bytes": callback.teacher_bytes}))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, __doc__, rounds=3, fit=MODES)
    if args.fit is not None:  # a child process (and, for rank 1, Lightning's relaunch of it)
        fit(args.fit, args.epochs, args.samples, args.out)
        return 0
    run = start_run("sharding.py", argv, threads=1)
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    ratios = []
    for index in range(args.rounds):
        for mode in MODES if index % 2 == 0 else MODES[::-1]:
            results[mode].append(run_child(__file__, mode, args))
        ratios.append(results["shard"][-1]["samples_per_s"] / results["replicate"][-1]["samples_per_s"])
        run.log(f"round {index + 1}/{args.rounds}: shard / replicate throughput {ratios[-1]:.2f}")
    rows = []
    for mode in MODES:
        rate = statistics.median(r["samples_per_s"] for r in results[mode])
        mib = results[mode][0]["teacher_bytes"] / 2**20
        rows.append(f"| `{mode}` | {mib:.2f} | {rate:.0f} |")
    lines = [
        f"## Teacher sharding on CPU (FSDP2, 2 processes): `{run.command}`",
        "",
        *machine_description(1, run.load_at_start),
        "",
        "| `teacher_sharding` | teacher MiB per rank (at rest) | median samples/s |",
        "|---|---:|---:|",
        *rows,
        "",
        f"Throughput shard / replicate: median {statistics.median(ratios):.2f} (per round "
        f"{', '.join(f'{r:.2f}' for r in ratios)}); {args.rounds} round(s), {args.epochs} epochs per fit (first "
        f"dropped), {args.samples} samples, batch {BATCH} per process.",
    ]
    return run.finish(lines, None)


if __name__ == "__main__":
    sys.exit(main())
