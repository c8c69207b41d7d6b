"""Strategies and precisions that need CUDA: FSDP, DeepSpeed, ``16-mixed``, a teacher on another device.

Every test here is marked ``gpu`` and skipped without CUDA (``tests/conftest.py``); run them on a GPU machine with
``python -m pytest -m gpu``. Each runs on one GPU (FSDP and ModelParallel with a world of one process).
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_distill import DistillationCallback, DistillModule, TeacherRunner
from tests.helpers.tiny import TinyTeacher, make_loader, make_trainer, tiny_student

pytestmark = pytest.mark.gpu


class TeacherChecks(L.Callback):
    """Compares, on every training batch, the teacher outputs with an unsharded float32 copy run on the same batch."""

    def __init__(self, teacher_callback: DistillationCallback, reference: nn.Module) -> None:
        self.teacher_callback, self.reference = teacher_callback, reference
        self.max_diff, self.dtypes, self.devices = 0.0, set(), set()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        logits = pl_module.teacher_outputs.logits  # type: ignore[attr-defined]
        with torch.no_grad():
            expected = self.reference.to(batch[0].device)(batch[0].float())
        self.max_diff = max(self.max_diff, float((logits.float() - expected).abs().max()))
        self.dtypes.add(logits.dtype)
        self.devices.add(logits.device.type)
        teacher = self.teacher_callback.teacher
        assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
        assert not {id(p) for p in teacher.parameters()} & {id(p) for p in trainer.strategy.model.parameters()}


def _fit(tmp_path: Any, callback: DistillationCallback, **trainer_kwargs: Any) -> TeacherChecks:
    torch.manual_seed(0)
    checks = TeacherChecks(callback, copy.deepcopy(callback.teacher).float())
    trainer = make_trainer(tmp_path, accelerator="cuda", devices=1, callbacks=[callback, checks], **trainer_kwargs)
    trainer.fit(DistillModule(student=tiny_student(), alpha=0.5, temperature=2.0), make_loader(n=64, batch_size=16))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    return checks


@pytest.mark.parametrize("sharding", ["shard", "replicate"])
def test_fsdp_teacher_sharded_or_replicated(tmp_path, sharding):
    callback = DistillationCallback(TeacherRunner(TinyTeacher(), sharding=sharding, shard_units=[nn.Linear]))
    checks = _fit(tmp_path, callback, strategy=FSDPStrategy())
    assert checks.max_diff < 1e-5 and checks.devices == {"cuda"}
    assert callback.teacher_sharded is (sharding == "shard")
    assert all(isinstance(p, DTensor) for p in callback.teacher.parameters()) is (sharding == "shard")


def test_model_parallel_teacher_sharded(tmp_path):
    callback = DistillationCallback(TeacherRunner(TinyTeacher(), sharding="shard"))
    checks = _fit(tmp_path, callback, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    assert checks.max_diff < 1e-5 and callback.teacher_sharded


def test_16_mixed_runs_the_teacher_in_float16_autocast(tmp_path):
    checks = _fit(tmp_path, DistillationCallback(TinyTeacher()), precision="16-mixed")
    assert checks.dtypes == {torch.float16} and checks.max_diff < 1e-2


def test_teacher_on_cpu_beside_a_cuda_student_hands_cuda_outputs(tmp_path):
    callback = DistillationCallback(TeacherRunner(TinyTeacher(), device="cpu"))
    checks = _fit(tmp_path, callback)
    assert next(callback.teacher.parameters()).device.type == "cpu"
    assert checks.devices == {"cuda"} and checks.max_diff < 1e-5


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_keeps_the_teacher_out_of_the_zero_engine(tmp_path, stage):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    callback = DistillationCallback(TinyTeacher())
    checks = _fit(tmp_path, callback, strategy=DeepSpeedStrategy(stage=stage), precision="bf16-mixed")
    assert not any(hasattr(p, "ds_id") for p in callback.teacher.parameters())  # never partitioned by ZeRO-3
    assert checks.max_diff < 5e-2
