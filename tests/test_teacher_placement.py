"""The teacher's own precision and device (`TeacherRunner(precision=..., device=...)`)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_distill import DistillationCallback, DistillModule
from lightning_distill.teacher import TeacherRunner
from tests.helpers.tiny import KwargsTeacher, make_data, make_loader, make_trainer, tiny_student, trained_teacher


class Spy(DistillationCallback):
    """Records the teacher logits' dtype and device as handed to the module."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[torch.dtype, torch.device]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logits = pl_module.teacher_outputs.logits
        self.seen.append((logits.dtype, logits.device))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("64", torch.float64)])
def test_teacher_runs_in_its_own_precision_for_a_float32_student(tmp_path, precision, dtype):
    teacher = trained_teacher()
    reference = teacher(make_data(16)[0]).detach()
    callback = Spy(TeacherRunner(teacher, precision=precision))
    module = DistillModule(student=tiny_student(), alpha=0.9, temperature=2.0)
    trainer = make_trainer(tmp_path, callbacks=[callback])
    trainer.fit(module, make_loader())
    assert all(p.dtype == dtype for p in callback.teacher.parameters())
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert callback.seen == [(dtype, torch.device("cpu"))] * 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    out = callback.runner.run(make_data(16)[0])
    torch.testing.assert_close(out.logits.float(), reference, atol=0.1, rtol=0.05)  # bf16 keeps ~3 digits


def test_own_precision_runs_outside_the_trainers_autocast(tmp_path):
    follow, own = Spy(trained_teacher()), Spy(TeacherRunner(trained_teacher(), precision="32"))
    for callback in (follow, own):
        make_trainer(tmp_path, precision="bf16-mixed", callbacks=[callback]).fit(
            DistillModule(student=tiny_student(), alpha=0.5), make_loader()
        )
    assert follow.seen[0][0] == torch.bfloat16  # inside the Trainer's autocast
    assert own.seen[0][0] == torch.float32  # its own float32, autocast left out


def test_own_precision_casts_floating_inputs_only():
    runner = TeacherRunner(KwargsTeacher(), precision="bf16")
    runner.place(torch.device("cpu"))
    captured: dict[str, Tensor] = {}
    runner.teacher.register_forward_pre_hook(lambda _m, _a, kw: captured.update(kw), with_kwargs=True)
    out = runner.run({"features": make_data(4)[0]})
    assert captured["features"].dtype == torch.bfloat16 and out.logits.dtype == torch.bfloat16


def test_teacher_device_is_recorded_and_unknown_devices_are_refused(tmp_path):
    callback = DistillationCallback(TeacherRunner(trained_teacher(), device="cpu", precision="bf16"))
    make_trainer(tmp_path, callbacks=[callback]).fit(DistillModule(student=tiny_student()), make_loader())
    assert callback.state_dict()["teacher_device"] == "cpu" and callback.state_dict()["teacher_precision"] == "bf16"
    if torch.cuda.device_count() < 4:
        missing = DistillationCallback(TeacherRunner(trained_teacher(), device="cuda:3"))
        with pytest.raises(RuntimeError, match=r"`device='cuda:3'` is not available: this machine has \d"):
            make_trainer(tmp_path, callbacks=[missing]).fit(DistillModule(student=tiny_student()), make_loader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(precision="fp8"), r"`precision` must be one of \['32', '64', '16', 'bf16'\] .*got 'fp8'\. HINT"),
        (dict(device="gpu0"), "`device` must be a device such as 'cpu' or 'cuda:1', got 'gpu0'.*HINT"),
    ],
)
def test_bad_precision_or_device_is_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TeacherRunner(trained_teacher(), **kwargs)
