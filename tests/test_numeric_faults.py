"""NaN and inf in a training step are named, never trained on (issue 17, item 4)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_distill import DistillationCallback, Distiller, DistillModule
from tests.helpers.tiny import IN_DIM, NUM_CLASSES, TinyTeacher, make_data, make_trainer, tiny_student


class Poisoned(nn.Module):
    """Logits of ``model`` with ``value`` written at ``[0, column]`` of every output."""

    def __init__(self, model: nn.Module, value: float, column: int = 0) -> None:
        super().__init__()
        self.model, self.value, self.column = model, value, column

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x).clone()
        logits[0, self.column] = self.value
        return logits


def _loader(nan_inputs: bool = False) -> torch.utils.data.DataLoader:
    x, y = make_data(32)
    if nan_inputs:
        x = x.clone()
        x[3, 2] = float("nan")
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _fit(tmp_path, module, teacher=None, loader=None):  # type: ignore[no-untyped-def]
    callbacks = [] if teacher is None else [DistillationCallback(teacher, check_accuracy=False)]
    trainer = make_trainer(tmp_path, callbacks=callbacks)
    trainer.fit(module, _loader() if loader is None else loader)
    return trainer


def _weights(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_a_student_giving_nan_is_named_and_nothing_is_trained(tmp_path):
    # it trained on to NaN weights
    torch.manual_seed(0)
    student = Poisoned(tiny_student(), float("nan"))
    module = DistillModule(student=student, alpha=0.5, temperature=2.0)
    before = _weights(student)
    with pytest.raises(
        FloatingPointError,
        match=r"training loss is nan at global step 0 \(epoch 0, batch 0\) \(the student's logits \(1 NaN and 0 \+inf "
        r"of 64\)\).*lower the learning rate.*check_finite=False",
    ):
        _fit(tmp_path, module, TinyTeacher())
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(student), strict=True))


def test_nan_inputs_without_a_teacher_are_named(tmp_path):
    # alpha=0 (no teacher): the cross-entropy of NaN inputs trained on silently
    module = DistillModule(student=tiny_student(), alpha=0.0)
    with pytest.raises(FloatingPointError, match=r"\(the batch's inputs \(1 NaN and 0 inf of 128\)\).*the data"):
        _fit(tmp_path, module, loader=_loader(nan_inputs=True))


class LaterNaN(Poisoned):
    """NaN at ``[0, 0]`` from the second call on (the callback always checks the teacher's first batch itself)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, float("nan"))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return super().forward(x) if self.calls > 1 else self.model(x)


def test_a_teacher_giving_nan_is_named_by_the_loss_check(tmp_path):
    module = DistillModule(student=tiny_student(), alpha=0.5)
    with pytest.raises(
        FloatingPointError, match=r"global step 1 .*\(the teacher's logits \(1 NaN and 0 \+inf of 64\)\).*checkpoint"
    ):
        _fit(tmp_path, module, LaterNaN(TinyTeacher()))


def test_a_term_that_overflows_is_named(tmp_path):
    # finite logits, an infinite term: 1e30 squared overflows float32 under divergence="mse"
    module = DistillModule(student=Poisoned(tiny_student(), 1e30), alpha=1.0, divergence="mse")
    with pytest.raises(FloatingPointError, match=r"training loss is inf .*\(loss = inf; kd_loss = inf\).*overflowed"):
        _fit(tmp_path, module, TinyTeacher())


def test_check_finite_false_trains_on(tmp_path):
    # the documented opt-out: the step runs (the student's weights become NaN); the teacher's per-step check of the
    # callback is back on since the module no longer checks
    torch.manual_seed(0)
    student = Poisoned(tiny_student(), float("nan"))
    _fit(tmp_path, DistillModule(student=student, alpha=0.5, check_finite=False), TinyTeacher())
    assert any(not torch.isfinite(p).all() for p in student.parameters())
    with pytest.raises(
        FloatingPointError, match=r"The teacher's logits contain 1 NaN/\+inf value\(s\) and 0 all -inf row\(s\)"
    ):
        _fit(tmp_path, DistillModule(student=tiny_student(), check_finite=False), Poisoned(TinyTeacher(), float("nan")))
    with pytest.raises(TypeError, match=r"`check_finite` must be True or False, got 1"):
        DistillModule(student=tiny_student(), check_finite=1)  # type: ignore[arg-type]


def test_the_step_is_named_past_the_first(tmp_path):
    class LateNaN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.calls = nn.Linear(IN_DIM, NUM_CLASSES), 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            out = self.net(x)
            return out * float("nan") if self.calls == 3 else out  # the third step: epoch 1, batch 0

    trainer = make_trainer(
        tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[DistillationCallback(TinyTeacher())]
    )
    with pytest.raises(FloatingPointError, match=r"at global step 2 \(epoch 1, batch 0\)"):
        trainer.fit(DistillModule(student=LateNaN(), alpha=0.5), _loader())


def test_the_distiller_checks_its_loss_too():
    torch.manual_seed(0)
    student = tiny_student()
    x, y = make_data(8)
    distiller = Distiller(TinyTeacher(), alpha=0.5)
    distiller.on_train_begin(student)
    distiller.loss(x, student(x), y).backward()  # finite: returned as ever
    bad = student(x).detach().clone()
    bad[2, 1] = float("inf")
    match = r"at distiller step 1 \(epoch 0\) \(the student's logits \(0 NaN and 1 \+inf of 32\)\).*Distiller\(check"
    with pytest.raises(FloatingPointError, match=match):
        distiller.loss(x, bad, y)
    unchecked = Distiller(TinyTeacher(), alpha=0.5, check_finite=False)
    unchecked.on_train_begin(student)
    assert not torch.isfinite(unchecked.loss(x, bad, y))


class NaNOnLargeInputs(nn.Module):
    """A teacher that is finite on the training data and gives NaN on inputs above 50 (the validation data here)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        return torch.where(x.abs().amax(-1, keepdim=True) > 50, float("nan"), logits)


def _fit_validating(tmp_path, teacher, **callback_args):  # type: ignore[no-untyped-def]
    x, y = make_data(32)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x * 1000, y), batch_size=16)
    callback = DistillationCallback(teacher, check_accuracy=False, **callback_args)
    trainer = make_trainer(tmp_path, callbacks=[callback], num_sanity_val_steps=0)
    trainer.fit(DistillModule(student=tiny_student(), alpha=0.5), _loader(), val)
    return trainer


def test_a_teacher_giving_nan_on_validation_batches_is_named(tmp_path):
    # it logged `val/kd_loss: nan` and `val/agreement: 0` as if they had been measured
    with pytest.raises(
        FloatingPointError,
        match=r"teacher's logits contain 64 NaN/\+inf value\(s\) .* on validation batch 0 \(global step 2, epoch 0\)",
    ):
        _fit_validating(tmp_path, NaNOnLargeInputs(TinyTeacher()))
    trainer = _fit_validating(tmp_path, NaNOnLargeInputs(TinyTeacher()), check_finite=False)  # the opt-out
    assert torch.isnan(trainer.callback_metrics["val/kd_loss"])


def test_masked_classes_are_not_a_fault_but_an_all_masked_row_is(tmp_path):
    # a -inf logit masks a class (a padded vocabulary): the teacher's check let no such teacher train
    _fit(tmp_path, DistillModule(student=tiny_student(), check_finite=False), Poisoned(TinyTeacher(), float("-inf")))

    class AllMasked(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            logits = torch.zeros(x.shape[0], NUM_CLASSES)
            logits[1] = float("-inf")
            return logits

    with pytest.raises(FloatingPointError, match=r"0 NaN/\+inf value\(s\) and 1 all -inf row\(s\) .* training batch 0"):
        _fit(tmp_path, DistillModule(student=tiny_student(), check_finite=False), AllMasked())
