"""DistillationCallback: the teacher's lifecycle inside a real Trainer."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from lightning_distill import DistillationCallback, DistillModule, TeacherOutputs
from tests.helpers.tiny import (
    NUM_CLASSES,
    DictDataset,
    KwargsTeacher,
    SoftmaxTeacher,
    TinyTeacher,
    make_loader,
    make_trainer,
    tiny_student,
    trained_teacher,
)


class InstrumentedCallback(DistillationCallback):
    """Asserts the teacher's state inside the hooks, after the real hook ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        assert not self.teacher.training
        assert all(not p.requires_grad for p in self.teacher.parameters())
        assert all(p.device == pl_module.device for p in self.teacher.parameters())
        outputs = pl_module.teacher_outputs
        assert isinstance(outputs, TeacherOutputs)
        assert not outputs.logits.requires_grad
        with torch.no_grad():
            expected = copy.deepcopy(self.teacher)(batch[0])
        torch.testing.assert_close(outputs.logits, expected, rtol=0, atol=0)
        self.train_batches += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        assert pl_module.teacher_outputs is None


def student_module(**kwargs: Any) -> DistillModule:
    torch.manual_seed(0)
    kwargs.setdefault("alpha", 0.7)
    kwargs.setdefault("temperature", 2.0)
    return DistillModule(student=tiny_student(), **kwargs)


def test_teacher_lifecycle_inside_hooks(tmp_path):
    teacher = trained_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    callback = InstrumentedCallback(teacher)
    module = student_module()
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    trainer.fit(module, make_loader(), make_loader())
    assert callback.train_batches == 4
    assert module.teacher_outputs is None
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not teacher.training


def test_teacher_stays_out_of_optimizer_and_checkpoint(tmp_path):
    teacher = TinyTeacher()
    module = student_module()
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(teacher)])
    trainer.fit(module, make_loader())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters()}
    assert not optimized & {id(p) for p in teacher.parameters()}

    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"student.{k}" for k in module.student.state_dict()}
    teacher_tensors = [v for v in teacher.state_dict().values()]
    for saved in checkpoint["state_dict"].values():
        assert not any(saved.shape == t.shape and torch.equal(saved, t) for t in teacher_tensors)
    (callback_state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("DistillationCallback")]
    assert callback_state["teacher_class"] == "TinyTeacher"
    assert len(pickle.dumps(callback_state)) < 1024


def test_training_loss_matches_an_independent_composition(tmp_path):
    teacher = trained_teacher()
    x, y = next(iter(make_loader()))
    module = student_module(alpha=0.6, temperature=3.0)
    with torch.no_grad():
        s, t = module(x), teacher(x)
        # written out here, independently of the package's loss code
        p_t = torch.softmax(t / 3.0, -1)
        kl = (p_t * (torch.log_softmax(t / 3.0, -1) - torch.log_softmax(s / 3.0, -1))).sum(-1).mean() * 9.0
        ce = -torch.log_softmax(s, -1).gather(1, y[:, None]).mean()
        expected = 0.6 * kl + 0.4 * ce
    seen: dict[str, torch.Tensor] = {}

    class Recording(DistillModule):
        def compute_loss(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            terms = super().compute_loss(*args, **kwargs)
            seen.update({k: v.detach() for k, v in terms.items()})
            return terms

    torch.manual_seed(0)
    recording = Recording(student=tiny_student(), alpha=0.6, temperature=3.0)
    recording.student.load_state_dict(module.student.state_dict())
    make_trainer(tmp_path, limit_train_batches=1, callbacks=[DistillationCallback(teacher)]).fit(
        recording, make_loader()
    )
    torch.testing.assert_close(seen["loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["kd_loss"], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["task_loss"], ce, rtol=1e-5, atol=1e-6)


def test_dict_batches_reach_teacher_and_student_as_keyword_arguments(tmp_path):
    class KwargsStudent(DistillModule):
        def __init__(self) -> None:
            super().__init__(alpha=0.5)
            self.net = tiny_student()

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.net(features)

    loader = torch.utils.data.DataLoader(DictDataset(), batch_size=8)
    module = KwargsStudent()
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(KwargsTeacher())])
    trainer.fit(module, loader, loader)
    assert {"train/kd_loss", "val/agreement", "val/acc"} <= set(trainer.callback_metrics)


def test_logits_layer_takes_the_pre_softmax_output(tmp_path):
    teacher = SoftmaxTeacher()
    callback = DistillationCallback(teacher, logits_layer="head")
    x, _ = next(iter(make_loader()))
    out = callback._runner.run(x)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, teacher.head(teacher.body(x)))
    make_trainer(tmp_path, callbacks=[callback]).fit(student_module(), make_loader())
    assert not callback.teacher.head._forward_hooks  # hooks removed at teardown


def test_validation_logs_teacher_accuracy_and_agreement(tmp_path):
    teacher = trained_teacher()
    module = student_module()
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(teacher)])
    (metrics,) = trainer.validate(module, make_loader(n=64, batch_size=16), verbose=False)
    x, y = torch.cat([b[0] for b in make_loader()]), torch.cat([b[1] for b in make_loader()])
    with torch.no_grad():
        t_pred, s_pred = teacher(x).argmax(-1), module(x).argmax(-1)
    limited = slice(0, 32)  # limit_val_batches=2 of 16
    assert metrics["val/teacher_acc"] == pytest.approx((t_pred == y)[limited].float().mean().item())
    assert metrics["val/agreement"] == pytest.approx((t_pred == s_pred)[limited].float().mean().item())
    assert metrics["val/acc"] == pytest.approx((s_pred == y)[limited].float().mean().item())


def test_run_on_validation_false_skips_the_teacher(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher(), run_on_validation=False)])
    (metrics,) = trainer.validate(student_module(), make_loader(), verbose=False)
    assert "val/acc" in metrics and "val/agreement" not in metrics


def test_chance_level_teacher_warns_and_trained_teacher_does_not(tmp_path):
    torch.manual_seed(3)
    untrained = nn.Sequential(nn.Linear(8, NUM_CLASSES))
    with torch.no_grad():
        untrained[0].weight.mul_(1e-3)
    loader = make_loader(n=128, batch_size=128)
    with pytest.warns(UserWarning, match="looks untrained"):
        make_trainer(tmp_path, callbacks=[DistillationCallback(untrained)]).fit(student_module(), loader)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, callbacks=[DistillationCallback(trained_teacher())]).fit(student_module(), loader)
        # a teacher weak on purpose: the check can be turned off
        make_trainer(tmp_path, callbacks=[DistillationCallback(untrained, check_accuracy=False)]).fit(
            student_module(), loader
        )
    assert not [w for w in caught if "looks untrained" in str(w.message)]
    with pytest.raises(TypeError, match=r"`check_accuracy` must be True or False, got 'no'"):
        DistillationCallback(untrained, check_accuracy="no")  # type: ignore[arg-type]


def test_bf16_mixed_precision_runs_teacher_in_the_precision_context(tmp_path):
    seen_dtypes: list[torch.dtype] = []
    teacher = TinyTeacher()
    teacher.head.register_forward_hook(lambda m, i, o: seen_dtypes.append(o.dtype))
    module = student_module()
    make_trainer(tmp_path, precision="bf16-mixed", callbacks=[DistillationCallback(teacher)]).fit(module, make_loader())
    assert seen_dtypes and set(seen_dtypes) == {torch.bfloat16}
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert teacher.head.weight.dtype == torch.float32  # mixed precision does not convert the weights


def test_bf16_true_precision_converts_the_teacher(tmp_path):
    teacher = TinyTeacher()
    module = student_module()
    make_trainer(tmp_path, precision="bf16-true", callbacks=[DistillationCallback(teacher)]).fit(module, make_loader())
    assert teacher.head.weight.dtype == torch.bfloat16


def test_resuming_with_a_different_teacher_warns(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())])
    trainer.fit(student_module(), make_loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    torch.manual_seed(123)
    other = make_trainer(tmp_path, max_epochs=2, callbacks=[DistillationCallback(TinyTeacher())])
    with pytest.warns(UserWarning, match="different teacher"):
        other.fit(student_module(), make_loader(), ckpt_path=tmp_path / "a.ckpt")


def test_test_stage_logs_teacher_metrics_too(tmp_path):
    trainer = make_trainer(tmp_path, limit_test_batches=2, callbacks=[DistillationCallback(trained_teacher())])
    (metrics,) = trainer.test(student_module(), make_loader(), verbose=False)
    assert {"test/acc", "test/teacher_acc", "test/agreement", "test/kd_loss"} <= set(metrics)
    assert metrics["test/teacher_acc"] > 0.8


def test_several_validation_dataloaders_get_their_own_metrics(tmp_path):
    teacher = trained_teacher()
    module = student_module()
    loaders = [make_loader(n=32, batch_size=16), make_loader(n=32, batch_size=16, seed=5)]
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(teacher)])
    metrics = trainer.validate(module, loaders, verbose=False)
    assert len(metrics) == len(loaders)
    for index, logged in enumerate(metrics):
        x, y = next(iter(make_loader(n=32, batch_size=32, seed=index * 5)))
        with torch.no_grad():
            t_pred, s_pred = teacher(x).argmax(-1), module(x).argmax(-1)
        suffix = f"/dataloader_idx_{index}"
        assert logged[f"val/acc{suffix}"] == pytest.approx((s_pred == y).float().mean().item())
        assert logged[f"val/teacher_acc{suffix}"] == pytest.approx((t_pred == y).float().mean().item())
        assert logged[f"val/agreement{suffix}"] == pytest.approx((t_pred == s_pred).float().mean().item())
