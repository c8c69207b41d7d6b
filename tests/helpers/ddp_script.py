"""Run by ``tests/test_distributed.py`` as ``python -m tests.helpers.ddp_script OUT_DIR``: a 2-process CPU ``ddp`` fit.

Lightning's ``ddp`` strategy relaunches this module for rank 1, so it must run as a script. Each rank checks, on
every training batch, that the teacher outputs handed to the module equal a single-process copy of the teacher run
on that rank's own batch, and writes what it saw to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_distill import DistillationCallback, DistillModule
from tests.helpers.tiny import TinyTeacher, make_loader, make_trainer, tiny_student


class Checks(L.Callback):
    def __init__(self, teacher_callback: DistillationCallback, reference: torch.nn.Module, out: Path) -> None:
        self.teacher_callback, self.reference, self.out = teacher_callback, reference, out
        self.report: dict[str, Any] = {"batches": 0, "max_teacher_diff": 0.0, "wrapped": False}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        with torch.no_grad():
            expected = self.reference(batch[0])
        got = pl_module.teacher_outputs.logits  # type: ignore[attr-defined]
        self.report["max_teacher_diff"] = max(self.report["max_teacher_diff"], float((got - expected).abs().max()))
        self.report["batches"] += 1
        self.report["wrapped"] |= isinstance(self.teacher_callback.teacher, DistributedDataParallel)
        self.report["ddp_module"] = isinstance(trainer.strategy.model, DistributedDataParallel)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ):
        # with sync_dist=True the logged step value is the mean of both ranks' losses, not this rank's own
        mean = float(pl_module.all_gather(outputs["loss"].detach()).mean())
        logged = float(trainer.callback_metrics["train/loss"])
        self.report["max_logged_vs_mean"] = max(self.report.get("max_logged_vs_mean", 0.0), abs(logged - mean))
        self.report["max_local_vs_mean"] = max(
            self.report.get("max_local_vs_mean", 0.0), abs(float(outputs["loss"]) - mean)
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        self.report["students_equal"] = bool(torch.equal(gathered[0], gathered[1]))
        self.report["world_size"] = trainer.world_size
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.report))


def main(out: Path) -> None:
    torch.manual_seed(0)
    teacher = TinyTeacher()
    reference = copy.deepcopy(teacher).eval()
    teacher_callback = DistillationCallback(teacher)
    trainer = make_trainer(
        out,
        strategy="ddp",
        devices=2,
        limit_train_batches=3,
        limit_val_batches=0,
        callbacks=[teacher_callback, Checks(teacher_callback, reference, out)],
    )
    trainer.fit(
        DistillModule(student=tiny_student(), alpha=0.5, temperature=2.0, sync_dist=True),
        make_loader(n=96, batch_size=8),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
