"""DistillationObjective: the one composition of the loss, against formulas written here with plain torch."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import DistillationCallback, Distiller, DistillModule, FeatureMap
from lightning_distill.losses.functional.topk import topk_log_probs
from lightning_distill.objective import DistillationObjective
from lightning_distill.schedules import LinearWarmup
from lightning_distill.teacher._runner import TeacherOutputs, TopKTeacher


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(p_t || p_s), in float64, written without the library."""
    s, t = student.double() / temperature, teacher.double() / temperature
    p_t = t.softmax(-1)
    return temperature**2 * (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean()


def test_the_loss_is_alpha_kd_plus_one_minus_alpha_task_plus_weighted_feature_terms():
    torch.manual_seed(0)
    fmap = FeatureMap(
        student="h", teacher="h", loss="mse", projector="linear", student_dim=3, teacher_dim=5, weight=0.7
    )
    objective = DistillationObjective(alpha=0.3, temperature=2.0, feature_maps=[fmap])
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    fs, ft = torch.randn(6, 3), torch.randn(6, 5)
    terms = objective(s, TeacherOutputs(t, {fmap.teacher_key: ft}), y, student_features={fmap.student_key: fs})

    projector = objective.projectors[fmap.key]
    feature = ((projector(fs).double() - ft.double()) ** 2).mean()
    expected = 0.3 * _kl(s, t, 2.0) + 0.7 * F.cross_entropy(s.double(), y) + 0.7 * feature
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms[f"feature_loss/{fmap.name}"].item() == pytest.approx(feature.item(), rel=1e-5)


def test_a_given_task_loss_takes_the_place_of_the_cross_entropy():
    objective = DistillationObjective(alpha=0.25, temperature=3.0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    task = torch.tensor(1.5)
    terms = objective(s, TeacherOutputs(t), None, task_loss=task)
    assert terms["loss"].item() == pytest.approx((0.25 * _kl(s, t, 3.0) + 0.75 * 1.5).item(), rel=1e-5)
    assert terms["task_loss"] is task


@pytest.mark.parametrize("cached", [False, True], ids=["full_logits", "topk_cache"])
def test_no_labels_with_a_task_weight_is_refused_on_every_path(cached):
    """With alpha < 1 and no target the full-logit path raised while the top-k cache path returned alpha * kd."""
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    outputs = TeacherOutputs(t)
    if cached:
        values, indices, tail = topk_log_probs(t, 3, 1.0)
        outputs = TeacherOutputs(t, topk=TopKTeacher(values, indices, tail, 1.0))
    with pytest.raises(ValueError, match=r"`target` is None but `alpha` is 0.5, so the task term \(weight 0.5\)"):
        DistillationObjective(alpha=0.5)(s, outputs, None)
    pure = DistillationObjective(alpha=1.0)(s, outputs, None)
    assert pure["loss"].item() == pytest.approx(pure["kd_loss"].item()) and pure["task_loss"].item() == 0.0


def test_schedules_are_evaluated_once_per_position():
    calls = []
    schedule = LinearWarmup(1.0, warmup=4, unit="step")
    original = type(schedule).__call__

    class Counting(type(schedule)):  # type: ignore[misc]
        def __call__(self, *, step: int, epoch: int) -> float:
            calls.append(step)
            return original(self, step=step, epoch=epoch)

    objective = DistillationObjective(alpha=Counting(1.0, warmup=4, unit="step"))
    calls.clear()  # whatever validation evaluated at construction
    for _ in range(3):
        assert objective.hparam_values(2, 0)["alpha"] == pytest.approx(0.5)
    assert objective.hparam_values(3, 0)["alpha"] == pytest.approx(0.75)
    assert calls == [2, 3]


class _CountingSplit(DistillModule):
    def __init__(self) -> None:
        super().__init__(student=nn.Linear(8, 3), alpha=0.5, temperature=2.0)
        self.splits = 0

    def split_batch(self, batch):
        self.splits += 1
        return super().split_batch(batch)


def test_each_batch_is_split_once_for_the_teacher_and_the_step(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 8), torch.randint(0, 3, (24,)))
    module = _CountingSplit()
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        callbacks=[DistillationCallback(nn.Linear(8, 3))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert module.splits == 3 + 2


def test_a_distiller_state_saved_before_the_objective_loads(tmp_path):
    """Before the objective existed the loop API's state lived under ``engine.``; such a state still loads."""
    torch.manual_seed(0)
    teacher, student = (
        nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)),
        nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3)),
    )
    fmap = FeatureMap(student="1", teacher="1", projector="linear", student_dim=2, teacher_dim=6)
    warmup = functools.partial(LinearWarmup, 1.0, warmup=4, unit="step")
    distiller = Distiller(teacher, alpha=warmup(), feature_maps=[fmap])
    distiller.on_train_begin(student)
    distiller.step = 3
    old = {f"engine.{k}" if k.startswith("objective.") else k: v for k, v in distiller.state_dict().items()}
    old = {k.replace("engine.objective.", "engine."): v for k, v in old.items()}
    old["engine._extra_state"] = old.pop("_extra_state")
    fresh = Distiller(teacher, alpha=warmup(), feature_maps=[fmap])
    fresh.load_state_dict(old)
    assert fresh.step == 3
    for name, value in distiller.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(fresh.state_dict()[name], value)


def test_a_distiller_takes_an_objective_or_its_arguments_not_both():
    teacher, objective = nn.Linear(4, 3), DistillationObjective(alpha=0.7, temperature=3.0)
    assert Distiller(teacher, objective=objective).objective is objective
    assert Distiller(teacher, alpha=0.7).objective.hparam_values()["alpha"] == 0.7
    with pytest.raises(ValueError, match=r"either `objective` or its arguments, got both \(`alpha`, `temperature`\)"):
        Distiller(teacher, objective=objective, alpha=0.5, temperature=2.0)
    with pytest.raises(TypeError, match=r"`objective` must be a DistillationObjective, got dict"):
        Distiller(teacher, objective={"alpha": 0.5})
