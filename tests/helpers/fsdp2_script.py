"""Run by ``tests/test_distributed.py`` as ``python -m tests.helpers.fsdp2_script OUT_DIR SHARDING [--no-root-shard]``.

A 2-process CPU fit (gloo) under Lightning's ``ModelParallelStrategy`` (FSDP2): the student and the projector are
sharded by ``configure_model``, the teacher is held as ``SHARDING`` says (``shard`` / ``replicate``). Each rank
checks, on every training batch, the teacher outputs against a local unsharded copy of the teacher run on that
rank's own batch, and writes what it saw to ``OUT_DIR/<SHARDING>-rank<r>.json``; rank 0 also saves the student's full
trained weights to ``OUT_DIR/<SHARDING>.pt``. With ``--no-root-shard`` the projector is left unsharded, and the
error the fit raises is written to ``OUT_DIR/error-rank<r>.txt``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_distill import DistillationCallback, DistillModule, FeatureMap, TeacherRunner
from tests.helpers.tiny import TinyTeacher, make_data, make_loader, make_trainer, tiny_student


class ShardedStudent(DistillModule):
    def __init__(self, shard_root: bool) -> None:
        # the student's layer "1" is 6 wide, the teacher's "body.1" 16: a Linear(6, 16) projector is inferred
        super().__init__(
            student=tiny_student(), alpha=0.5, temperature=2.0, feature_maps=[FeatureMap(student="1", teacher="body.1")]
        )
        self.shard_root = shard_root
        self.example_input_array = make_data(2)[0]

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.student[0], self.student[2]):
            fully_shard(layer, mesh=mesh)
        if self.shard_root:  # takes in the projectors, so their gradients are reduced too
            fully_shard(self, mesh=mesh)


class Checks(L.Callback):
    def __init__(self, teacher_callback: DistillationCallback, reference: nn.Module, out: Path, name: str) -> None:
        self.teacher_callback, self.reference, self.out, self.name = teacher_callback, reference, out, name
        self.report: dict[str, Any] = {"batches": 0, "max_teacher_diff": 0.0, "features": 0}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        with torch.no_grad():
            expected = self.reference(batch[0])
        outputs = pl_module.teacher_outputs  # type: ignore[attr-defined]
        self.report["max_teacher_diff"] = max(
            self.report["max_teacher_diff"], float((outputs.logits - expected).abs().max())
        )
        self.report["features"] = len(outputs.features)
        self.report["batches"] += 1
        teacher = self.teacher_callback.teacher
        wrapped = {id(p) for p in trainer.strategy.model.parameters()}
        self.report["teacher_in_model"] = bool(wrapped & {id(p) for p in teacher.parameters()})
        self.report["teacher_frozen_eval"] = not teacher.training and all(
            not p.requires_grad for p in teacher.parameters()
        )
        self.report["teacher_dtensor"] = all(isinstance(p, DTensor) for p in teacher.parameters())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report["teacher_bytes"] = self.teacher_callback.teacher_bytes
        self.report["teacher_sharded"] = self.teacher_callback.teacher_sharded
        self.report["world_size"] = trainer.world_size
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in pl_module.state_dict().items()}
        self.out.mkdir(parents=True, exist_ok=True)
        if trainer.global_rank == 0:
            torch.save(full, self.out / f"{self.name}.pt")
        (self.out / f"{self.name}-rank{trainer.global_rank}.json").write_text(json.dumps(self.report))


def main(out: Path, sharding: str, shard_root: bool) -> None:
    torch.manual_seed(0)
    teacher = TinyTeacher()
    reference = copy.deepcopy(teacher).eval()
    runner = TeacherRunner(teacher, sharding=sharding, shard_units=[nn.Linear])  # type: ignore[arg-type]
    teacher_callback = DistillationCallback(runner)
    trainer = make_trainer(
        out,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        devices=2,
        limit_train_batches=3,
        limit_val_batches=0,
        callbacks=[teacher_callback, Checks(teacher_callback, reference, out, sharding)],
    )
    torch.manual_seed(1)
    try:
        trainer.fit(ShardedStudent(shard_root), make_loader(n=96, batch_size=8))
    except RuntimeError as err:
        if shard_root:
            raise
        out.mkdir(parents=True, exist_ok=True)
        (out / f"error-rank{trainer.global_rank}.txt").write_text(str(err))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], shard_root="--no-root-shard" not in sys.argv[3:])
