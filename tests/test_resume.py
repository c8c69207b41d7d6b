"""A crash-and-resume run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_distill import DistillationCallback, DistillModule, FeatureMap
from lightning_distill.schedules import Cosine, LinearWarmup
from tests.helpers.tiny import make_data, make_loader, make_trainer, tiny_student, trained_teacher

EPOCHS, CRASH_AT = 4, 2


class Crash(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == CRASH_AT:
            raise RuntimeError("simulated crash")


def build(seed: int = 0, features: bool = False) -> DistillModule:
    torch.manual_seed(seed)
    module = DistillModule(
        student=tiny_student(),
        alpha=LinearWarmup(0.8, warmup=6, unit="step") if features else 0.8,
        temperature=Cosine(4.0, 1.0, length=EPOCHS) if features else 3.0,
        # student layer "1" is 6 wide, the teacher's "body.1" 16: an inferred linear projector
        feature_maps=[FeatureMap(student="1", teacher="body.1", weight=LinearWarmup(0.5, warmup=2))]
        if features
        else None,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=EPOCHS),
    )
    module.example_input_array = make_data(2)[0]
    return module


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run saves no checkpoints
@pytest.mark.parametrize("features", [False, True], ids=["logits", "features+schedules"])
def test_crash_and_resume_equals_uninterrupted_run(tmp_path, features):
    teacher = trained_teacher()
    loader = make_loader(n=64, batch_size=16)

    straight = build(features=features)
    make_trainer(
        tmp_path / "a", max_epochs=EPOCHS, limit_train_batches=None, callbacks=[DistillationCallback(teacher)]
    ).fit(straight, loader)

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    crashed = build(features=features)
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

    resumed = build(seed=1, features=features)  # different initial weights: everything must come from the checkpoint
    make_trainer(
        tmp_path / "c", max_epochs=EPOCHS, limit_train_batches=None, callbacks=[DistillationCallback(teacher)]
    ).fit(resumed, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert len(list(straight.parameters())) == len(list(tiny_student().parameters())) + 2 * features
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
