"""Every bad input raises (or warns) with a message that names the bad value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_distill import DistillationCallback, DistillModule, TeacherRunner
from tests.helpers.tiny import TinyTeacher, make_loader, make_trainer, tiny_student


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"alpha.*1\.5"),
        ({"alpha": -0.1}, r"alpha.*-0\.1"),
        ({"temperature": 0.0}, r"temperature.*0\.0"),
        ({"temperature": -2.0}, r"temperature.*-2\.0"),
        ({"divergence": "kld"}, r"one of 'kl', 'reverse_kl'.*got 'kld'"),
    ],
)
def test_bad_loss_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillModule(student=tiny_student(), **kwargs)


def test_student_must_be_a_module():
    with pytest.raises(TypeError, match=r"`student` must be a torch\.nn\.Module, got str"):
        DistillModule(student="resnet18")  # type: ignore[arg-type]


def test_class_count_mismatch_names_both_shapes(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher(num_classes=5))])
    with pytest.raises(ValueError, match=r"\(16, 4\).*\(16, 5\)"):
        trainer.fit(DistillModule(student=tiny_student(), alpha=0.5), make_loader())


def test_unknown_logits_layer_lists_the_closest_names():
    with pytest.raises(ValueError, match=r"no layer named 'haed'.*'head'"):
        DistillationCallback(TeacherRunner(TinyTeacher(), logits_layer="haed"))


def test_missing_teacher_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        DistillationCallback(TeacherRunner(TinyTeacher(), checkpoint=tmp_path / "nope.ckpt"))


def test_mismatched_teacher_checkpoint_lists_keys_and_shapes(tmp_path):
    torch.save(TinyTeacher(num_classes=7).state_dict(), tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"does not match.*head\.weight: checkpoint \(7, 16\) vs teacher \(4, 16\)"):
        DistillationCallback(TeacherRunner(TinyTeacher(), checkpoint=tmp_path / "t.pt"))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "u.pt")
    with pytest.raises(ValueError, match=r"missing keys \['body.0.bias'.*unexpected keys \['other.weight'\]"):
        DistillationCallback(TeacherRunner(TinyTeacher(), checkpoint=tmp_path / "u.pt"))


def test_teacher_checkpoint_that_is_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        DistillationCallback(TeacherRunner(TinyTeacher(), checkpoint=tmp_path / "list.pt"))


def test_teacher_checkpoint_loads_plain_and_lightning_files(tmp_path):
    source = TinyTeacher()
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, tmp_path / "l.ckpt")
    for name in ("plain.pt", "l.ckpt"):
        teacher = DistillationCallback(TeacherRunner(TinyTeacher(), checkpoint=tmp_path / name)).teacher
        for a, b in zip(teacher.state_dict().values(), source.state_dict().values(), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        ((1, 2, 3), ValueError, "length 3.*override `DistillModule.split_batch`"),
        ({"labels": 1, "y": 2}, ValueError, r"several target keys \['labels', 'y'\]"),
        (object(), TypeError, "type object.*override `DistillModule.split_batch`"),
    ],
)
def test_unreadable_batches(batch, error, match):
    with pytest.raises(error, match=match):
        DistillModule().split_batch(batch)


def test_nan_teacher_logits_name_the_step(tmp_path):
    class NanAfterTwoCalls(TinyTeacher):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out = super().forward(x)
            return out if self.calls < 3 else out * float("nan")

    trainer = make_trainer(tmp_path, limit_train_batches=4, callbacks=[DistillationCallback(NanAfterTwoCalls())])
    match = r"loss is nan at global step 2 \(epoch 0, batch 2\) \(the teacher's logits \(64 NaN and 0 \+inf of 64\)\)"
    with pytest.raises(FloatingPointError, match=match):
        trainer.fit(DistillModule(student=tiny_student(), alpha=0.5), make_loader())


def test_data_parallel_teacher_is_refused():
    with pytest.raises(TypeError, match=r"wrapped in DataParallel.*teacher\.module"):
        DistillationCallback(nn.DataParallel(TinyTeacher()))


def test_teacher_must_be_a_module():
    match = r"`teacher` must be a torch\.nn\.Module or a TeacherRunner, got dict\. HINT: `DistillationCallback\(my_"
    with pytest.raises(TypeError, match=match):
        DistillationCallback({"weights": 1})  # type: ignore[arg-type]


def test_non_distill_module_is_refused(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    with pytest.raises(TypeError, match="needs a DistillModule, got BoringModel"):
        make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())]).fit(BoringModel())


def test_teacher_sharing_parameters_with_the_student_is_refused(tmp_path):
    student = tiny_student()
    with pytest.raises(ValueError, match=r"shares parameters with the student.*deepcopy"):
        make_trainer(tmp_path, callbacks=[DistillationCallback(student)]).fit(
            DistillModule(student=student, alpha=0.5), make_loader()
        )


def test_teacher_without_logits_suggests_logits_layer(tmp_path):
    class TupleTeacher(TinyTeacher):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            return super().forward(x), x

    with pytest.raises(TypeError, match=r"Cannot find logits in the teacher's output of type tuple.*logits_layer"):
        make_trainer(tmp_path, callbacks=[DistillationCallback(TupleTeacher())]).fit(
            DistillModule(student=tiny_student(), alpha=0.5), make_loader()
        )


@pytest.mark.parametrize("name", ["run_on_validation", "check_finite", "allow_untested"])
def test_callback_flags_must_be_bools(name):
    with pytest.raises(TypeError, match=rf"`{name}` must be True or False, got 'yes'"):
        DistillationCallback(TinyTeacher(), **{name: "yes"})


def test_teacher_checkpoint_must_be_a_path():
    match = r"`checkpoint` must be a path \(str or Path\), got dict\. HINT: `TeacherRunner\(teacher, checkpoint="
    with pytest.raises(TypeError, match=match):
        DistillationCallback(TeacherRunner(TinyTeacher(), checkpoint={"weight": 1}))  # type: ignore[arg-type]


def test_optimizer_instance_instead_of_factory_is_refused():
    net = tiny_student()
    with pytest.raises(TypeError, match=r"`optimizer` must be a factory.*got an instance of Adam.*functools\.partial"):
        DistillModule(student=net, optimizer=torch.optim.Adam(net.parameters()))  # type: ignore[arg-type]
