"""A crash-and-resume run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_distill import DistillationCallback, DistillModule
from tests.helpers.tiny import make_loader, make_trainer, tiny_student, trained_teacher

EPOCHS, CRASH_AT = 4, 2


class Crash(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == CRASH_AT:
            raise RuntimeError("simulated crash")


def build(seed: int = 0) -> DistillModule:
    torch.manual_seed(seed)
    return DistillModule(
        student=tiny_student(),
        alpha=0.8,
        temperature=3.0,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=EPOCHS),
    )


def test_crash_and_resume_equals_uninterrupted_run(tmp_path):
    teacher = trained_teacher()
    loader = make_loader(n=64, batch_size=16)

    straight = build()
    make_trainer(
        tmp_path / "a", max_epochs=EPOCHS, limit_train_batches=None, callbacks=[DistillationCallback(teacher)]
    ).fit(straight, loader)

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    crashed = build()
    trainer = make_trainer(
        tmp_path / "b",
        max_epochs=EPOCHS,
        limit_train_batches=None,
        enable_checkpointing=True,
        callbacks=[DistillationCallback(teacher), checkpoints, Crash()],
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(crashed, loader)
    assert trainer.current_epoch == CRASH_AT

    resumed = build(seed=1)  # different initial weights: everything must come from the checkpoint
    make_trainer(
        tmp_path / "c", max_epochs=EPOCHS, limit_train_batches=None, callbacks=[DistillationCallback(teacher)]
    ).fit(resumed, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
