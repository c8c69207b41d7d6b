"""The loop API (`Distiller`): same loss as the Trainer API, the INC-style hooks in a user loop, bad call orders."""

from __future__ import annotations

import copy
import functools

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_distill import DistillationCallback, Distiller, DistillModule, FeatureMap
from lightning_distill.schedules import LinearWarmup
from tests.helpers.processes import REPO_ROOT
from tests.helpers.reference import ref_kd_loss
from tests.helpers.tiny import TinyTeacher, make_data, make_loader, make_trainer, tiny_student, trained_teacher

MAP = FeatureMap(student="1", teacher="body.1")  # student layer "1" is 6 wide, the teacher's "body.1" 16


class FirstLoss(L.Callback):
    """Keeps the loss of the Trainer's first training step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == 0:
            self.loss = float(outputs["loss"])
            self.terms = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


def test_loop_api_and_trainer_api_give_the_same_loss_for_the_same_batch_and_weights(tmp_path):
    torch.manual_seed(0)
    teacher, student = trained_teacher(), tiny_student()
    x, y = make_data(16)
    module = DistillModule(
        student=copy.deepcopy(student),
        alpha=0.6,
        temperature=3.0,
        feature_maps=[MAP],
        optimizer=functools.partial(torch.optim.SGD, lr=0.0),  # weights stay as they were at the first step
    )
    module.example_input_array = x[:2]
    first = FirstLoss()
    make_trainer(tmp_path, limit_train_batches=1, callbacks=[DistillationCallback(copy.deepcopy(teacher)), first]).fit(
        module, make_loader(n=16, batch_size=16)
    )

    distiller = Distiller(teacher, alpha=0.6, temperature=3.0, feature_maps=[MAP])
    distiller.on_train_begin(student, example_inputs=x[:2])
    projectors = {f"objective.{k}": v for k, v in module.state_dict().items() if k.startswith("projectors.")}
    assert distiller.load_state_dict(projectors, strict=False).unexpected_keys == []
    distiller.on_step_begin()
    loss = distiller.loss(x, student(x), y)
    assert loss.item() == pytest.approx(first.loss, rel=1e-6)
    for name, value in distiller.last_terms.items():
        assert value.item() == pytest.approx(first.terms[f"train/{name}"], rel=1e-5), name


def test_on_after_compute_loss_mixes_your_task_loss_with_an_independent_kd_reference():
    torch.manual_seed(0)
    teacher, student = trained_teacher(), tiny_student()
    x, y = make_data(16)
    distiller = Distiller(teacher, alpha=0.7, temperature=2.5)
    distiller.on_train_begin(student)
    out = student(x)
    task = nn.functional.cross_entropy(out, y)
    combined = distiller.on_after_compute_loss(x, out, task)
    kd = ref_kd_loss(  # includes the T^2 factor
        out.detach().numpy().astype(np.float64), teacher(x).detach().numpy(), temperature=2.5
    )
    assert combined.item() == pytest.approx(0.7 * kd + 0.3 * task.item(), rel=1e-5)
    assert distiller.loss(x, out, y).item() == pytest.approx(combined.item(), rel=1e-6)  # CE given == CE computed


def test_inc_style_hook_sequence_trains_the_student_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    teacher, student = trained_teacher(), tiny_student()
    teacher.zero_grad(set_to_none=True)  # its own training left gradients behind
    before = copy.deepcopy(teacher.state_dict())
    x, y = make_data(256, seed=5)
    distiller = Distiller(teacher, alpha=0.9, temperature=2.0, feature_maps=[MAP])
    distiller.on_train_begin(student, example_inputs=x[:2])
    optimizer = torch.optim.Adam([*student.parameters(), *distiller.parameters()], lr=1e-2)
    agreement = lambda: float((student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean())  # noqa: E731
    start = agreement()
    for epoch in range(20):
        distiller.on_epoch_begin(epoch)
        for i in range(0, 256, 32):
            distiller.on_step_begin(i)
            loss = distiller.loss(x[i : i + 32], student(x[i : i + 32]), y[i : i + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            distiller.on_after_optimizer_step()
            assert not teacher.training and all(p.grad is None for p in teacher.parameters())
        distiller.on_epoch_end()
    distiller.on_train_end()
    assert agreement() > max(start, 0.8)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert distiller.step == 160 and distiller.epoch == 20
    assert not any(m._forward_hooks for m in (*student.modules(), *teacher.modules()))  # hooks removed


def test_projectors_left_out_of_the_optimizer_are_named_after_the_first_step():
    torch.manual_seed(0)
    student, (x, y) = tiny_student(), make_data(8)
    distiller = Distiller(TinyTeacher(), feature_maps=[MAP])
    distiller.on_train_begin(student, example_inputs=x[:2])
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)  # the projector is missing
    distiller.on_step_begin()
    distiller.loss(x, student(x), y).backward()
    optimizer.step()
    names = r"\['objective.projectors.1.weight', 'objective.projectors.1.bias'\]"
    with pytest.raises(RuntimeError, match=names + " have not"):
        distiller.on_after_optimizer_step()


def test_schedules_follow_the_loops_counters_and_resume_from_the_state_dict():
    torch.manual_seed(0)
    student, (x, y) = tiny_student(), make_data(8)
    distiller = Distiller(TinyTeacher(), alpha=LinearWarmup(1.0, warmup=4, unit="step"), temperature=2.0)
    distiller.on_train_begin(student)
    seen = []
    for _ in range(3):
        seen.append(distiller.hparam_values()["alpha"])
        distiller.loss(x, student(x), y)
    assert seen == [0.0, 0.25, 0.5]
    distiller.on_epoch_end()
    resumed = Distiller(TinyTeacher(), alpha=LinearWarmup(1.0, warmup=4, unit="step"), temperature=2.0)
    resumed.load_state_dict(distiller.state_dict())
    assert (resumed.step, resumed.epoch, resumed.hparam_values()["alpha"]) == (3, 1, 0.75)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        ("loss_first", RuntimeError, r"`distiller.loss` was called before `distiller.on_train_begin\(student\)`"),
        ("step_first", RuntimeError, r"`distiller.on_step_begin` was called before"),
        ("no_step_begin", RuntimeError, r"call `distiller.on_step_begin\(\)` before the student's forward"),
        ("no_example", ValueError, r"`on_train_begin` needs `example_inputs`"),
        ("bad_task_loss", TypeError, r"`student_loss` must be a scalar tensor"),
        ("shared", ValueError, "The teacher shares parameters with the student"),
        ("not_a_module", TypeError, r"`student` must be a torch\.nn\.Module, got function"),
        ("bad_epoch", ValueError, r"`epoch` must be a non-negative int, got -1"),
    ],
)
def test_bad_call_orders_are_explained(call, error, match):
    student, (x, y) = tiny_student(), make_data(8)
    distiller = Distiller(TinyTeacher(), feature_maps=[MAP] if call in ("no_step_begin", "no_example") else None)
    with pytest.raises(error, match=match):
        if call == "loss_first":
            distiller.loss(x, student(x), y)
        elif call == "step_first":
            distiller.on_step_begin()
        elif call == "no_example":
            distiller.on_train_begin(student)
        elif call == "shared":
            Distiller(student).on_train_begin(student)
        elif call == "not_a_module":
            distiller.on_train_begin(lambda x: x)  # type: ignore[arg-type]
        elif call == "bad_epoch":
            distiller.on_epoch_begin(-1)
        else:
            distiller.on_train_begin(student, example_inputs=x[:2])
            if call == "no_step_begin":
                distiller.loss(x, student(x), y)
            else:
                distiller.on_after_compute_loss(x, student(x), torch.ones(8))


def test_a_missing_teacher_or_dkd_without_labels_is_explained():
    with pytest.raises(TypeError, match=r"`teacher` must be a torch\.nn\.Module, got NoneType"):
        Distiller(None)  # type: ignore[arg-type]
    student, (x, y) = tiny_student(), make_data(8)
    distiller = Distiller(TinyTeacher(), divergence="dkd")
    distiller.on_train_begin(student)
    with pytest.raises(ValueError, match="dkd"):
        distiller.on_after_compute_loss(x, student(x), nn.functional.cross_entropy(student(x), y))


def _example(name: str) -> str:
    return (REPO_ROOT / "examples" / f"{name}.py").read_text()


@pytest.mark.parametrize("name", ["fabric_loop", "plain_loop"])
def test_the_readme_shows_the_tested_examples_verbatim(name):
    body = _example(name).split('"""', 2)[2].strip()  # everything after the module docstring
    readme = (REPO_ROOT / "README.md").read_text()
    assert body in readme, f"README.md no longer shows examples/{name}.py"


def _load(name: str):  # type: ignore[no-untyped-def]
    namespace: dict[str, object] = {"__name__": f"example_{name}"}
    exec(compile(_example(name), f"examples/{name}.py", "exec"), namespace)
    return namespace["train"]


def _agreement(student: nn.Module, teacher: nn.Module) -> float:
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean())


def test_plain_pytorch_example_runs_and_the_student_learns_the_teacher():
    student, distiller = _load("plain_loop")(epochs=3)
    assert distiller.step == 3 * 16 and _agreement(student, distiller.teacher) > 0.5


def test_fabric_example_on_cpu_runs_and_the_student_learns_the_teacher():
    fabric = Fabric(accelerator="cpu", devices=1)
    student, distiller = _load("fabric_loop")(fabric, epochs=3)
    assert distiller.epoch == 3 and not distiller.teacher.training
    assert _agreement(student, distiller.teacher) > 0.5
    names = [name for name, _ in distiller.named_parameters()]  # Fabric's wrapper adds `_forward_module.`
    assert names == ["_forward_module.objective.projectors.1.weight", "_forward_module.objective.projectors.1.bias"]
