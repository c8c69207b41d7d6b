"""DistillModule: the student side, with and without the callback."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lightning_distill import DistillationCallback, DistillModule, TeacherOutputs
from tests.helpers.tiny import TinyTeacher, make_loader, make_trainer, tiny_student


class SubclassStudent(DistillModule):
    def __init__(self) -> None:
        super().__init__(alpha=0.9, temperature=4.0)
        self.net = tiny_student()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_subclass_form_trains_and_logs_every_term(tmp_path):
    module = SubclassStudent()
    before = [p.clone() for p in module.parameters()]
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())])
    trainer.fit(module, make_loader(), make_loader())
    assert {"train/loss", "train/task_loss", "train/kd_loss", "val/acc", "val/loss"} <= set(trainer.callback_metrics)
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_wrapped_form_uses_the_optimizer_and_scheduler_factories(tmp_path):
    module = DistillModule(
        student=tiny_student(),
        alpha=0.5,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[DistillationCallback(TinyTeacher())])
    trainer.fit(module, make_loader())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)


def test_default_optimizer_is_adam_with_lr_1e_3():
    optimizer = DistillModule(student=tiny_student()).configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-3


def test_training_without_the_callback_raises_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"alpha=0\.5 but received no teacher outputs.*DistillationCallback"):
        make_trainer(tmp_path).fit(DistillModule(student=tiny_student(), alpha=0.5), make_loader())


def test_alpha_zero_trains_the_student_alone_with_cross_entropy(tmp_path):
    module = DistillModule(student=tiny_student(), alpha=0.0)
    trainer = make_trainer(tmp_path, limit_train_batches=1)
    trainer.fit(module, make_loader())
    assert "train/kd_loss" not in trainer.callback_metrics
    assert trainer.callback_metrics["train/loss"] == trainer.callback_metrics["train/task_loss"]


def test_alpha_zero_with_a_teacher_warns_that_it_is_unused(tmp_path):
    with pytest.warns(UserWarning, match="alpha=0.0"):
        make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())]).fit(
            DistillModule(student=tiny_student(), alpha=0.0), make_loader()
        )


def test_validate_test_predict_run_without_the_callback(tmp_path):
    module = DistillModule(student=tiny_student(), alpha=0.9)
    trainer = make_trainer(tmp_path)
    (val,) = trainer.validate(module, make_loader(), verbose=False)
    (test,) = trainer.test(module, make_loader(), verbose=False)
    assert set(val) == {"val/loss", "val/acc"} and set(test) == {"test/loss", "test/acc"}
    predictions = trainer.predict(module, make_loader(n=16, batch_size=8))
    x, _ = next(iter(make_loader(n=16, batch_size=16)))
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(predictions), module.student(x))


def test_export_student_returns_the_plain_network(tmp_path):
    module = DistillModule(student=tiny_student(), alpha=0.5)
    make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())]).fit(module, make_loader())
    exported = module.export_student()
    assert type(exported) is nn.Sequential and not exported.training
    assert exported is not module.student
    x = torch.randn(3, 8)
    torch.testing.assert_close(exported(x), module.student(x))


def test_export_student_of_a_subclass_runs_alone(tmp_path):
    module = SubclassStudent()
    make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())]).fit(module, make_loader())
    exported = module.export_student()
    x = torch.randn(3, 8)
    torch.testing.assert_close(exported(x), module(x))
    assert exported.teacher_outputs is None and module.trainer is not None


def test_wrapped_form_reloads_its_hyperparameters_from_a_checkpoint(tmp_path):
    module = DistillModule(student=tiny_student(), alpha=0.3, temperature=5.0, divergence="js")
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())])
    trainer.fit(module, make_loader())
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    restored = DistillModule.load_from_checkpoint(tmp_path / "s.ckpt", student=tiny_student())
    assert (restored.alpha, restored.temperature, restored.divergence) == (0.3, 5.0, "js")
    for a, b in zip(module.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_logged_hyperparameters_hold_no_network_factory_or_schedule_object(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_distill.schedules import LinearWarmup

    module = DistillModule(
        student=tiny_student(),
        alpha=LinearWarmup(0.5, warmup=2),
        temperature=2.0,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    assert {"student", "optimizer"}.isdisjoint(module.hparams_initial) and "temperature" in module.hparams_initial
    assert module.hparams_initial["alpha"] == module.hparams["alpha"] == LinearWarmup(0.5, warmup=2).to_config()
    trainer = make_trainer(tmp_path, logger=CSVLogger(tmp_path, name="run", version=""))
    trainer.fit(module, make_loader())
    written = (tmp_path / "run" / "hparams.yaml").read_text()  # what the logger wrote: small, plain YAML
    assert "student" not in written and "!!python" not in written and "temperature: 2.0" in written


@pytest.mark.parametrize(
    ("batch", "inputs", "target"),
    [
        ((1, 2), 1, 2),
        ([1, 2], 1, 2),
        ((1,), 1, None),
        ({"x": 1, "label": 2}, {"x": 1}, 2),
        ({"x": 1, "target": 2, "m": 3}, {"x": 1, "m": 3}, 2),
        ({"input_ids": 1}, {"input_ids": 1}, None),
    ],
)
def test_split_batch_reads_common_structures(batch, inputs, target):
    assert DistillModule().split_batch(batch) == (inputs, target)


def test_compute_loss_with_teacher_outputs_returns_all_terms():
    module = DistillModule(student=tiny_student(), alpha=1.0, temperature=2.0)
    logits = torch.randn(5, 4)
    terms = module.compute_loss(logits, TeacherOutputs(logits.clone()), None)
    assert terms["loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["kd_loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_forward_without_student_or_override_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"DistillModule has no `student`: pass `student=`.*override `forward`"):
        DistillModule()(torch.randn(2, 8))


def test_student_returning_no_logits_is_explained():
    class TupleNet(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(TypeError, match=r"Cannot find logits in the student's output of type tuple.*`forward`"):
        DistillModule(student=TupleNet()).student_logits(torch.randn(2, 8))
