"""The deprecated DistillationCallback keywords: each warns naming the new spelling and still behaves as before."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_distill import DistillationCallback, DistillModule, TeacherMixture, TeacherRunner
from tests.helpers.tiny import SoftmaxTeacher, TinyTeacher, make_loader, make_trainer, tiny_student

OLD_AND_NEW: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    # (old keywords, the TeacherRunner keywords that replace them, the message's spelling of both)
    (
        dict(teacher_device="cpu"),
        dict(device="cpu"),
        "`DistillationCallback(teacher, teacher_device='cpu')` is deprecated: pass "
        "`DistillationCallback(TeacherRunner(teacher, device='cpu'))`",
    ),
    (
        dict(teacher_precision="bf16"),
        dict(precision="bf16"),
        "`DistillationCallback(teacher, teacher_precision='bf16')` is deprecated: pass "
        "`DistillationCallback(TeacherRunner(teacher, precision='bf16'))`",
    ),
    (
        dict(logits_layer="head"),
        dict(logits_layer="head"),
        "`DistillationCallback(teacher, logits_layer='head')` is deprecated: pass "
        "`DistillationCallback(TeacherRunner(teacher, logits_layer='head'))`",
    ),
    (
        dict(teacher_sharding="replicate"),
        dict(sharding="replicate"),
        "`DistillationCallback(teacher, teacher_sharding='replicate')` is deprecated: pass "
        "`DistillationCallback(TeacherRunner(teacher, sharding='replicate'))`",
    ),
    (
        dict(teacher_shard_units=[nn.Linear]),
        dict(shard_units=[nn.Linear]),
        "`DistillationCallback(teacher, teacher_shard_units=[Linear])` is deprecated: pass "
        "`DistillationCallback(TeacherRunner(teacher, shard_units=[Linear]))`",
    ),
    (
        dict(teacher_device="cpu", teacher_precision="64"),
        dict(device="cpu", precision="64"),
        "`DistillationCallback(teacher, teacher_precision='64', teacher_device='cpu')` is deprecated: pass "
        "`DistillationCallback(TeacherRunner(teacher, precision='64', device='cpu'))`",
    ),
]


def seeded_teacher() -> TinyTeacher:
    torch.manual_seed(0)
    return TinyTeacher()  # logits, so every case fits (a SoftmaxTeacher without `logits_layer` is refused)


def deprecated(call: Any) -> tuple[Any, str]:
    """Run ``call`` and return its result and the one DeprecationWarning it raised, checked to point at the caller."""
    with pytest.warns(DeprecationWarning) as recorded:
        result = call()
    assert len(recorded) == 1
    assert recorded[0].filename == __file__  # the warning names the line that used the old keyword
    return result, str(recorded[0].message)


@pytest.mark.parametrize(("old", "new", "spelled"), OLD_AND_NEW)
def test_each_placement_keyword_warns_and_builds_the_same_runner(tmp_path, old, new, spelled):
    old_style, message = deprecated(lambda: DistillationCallback(seeded_teacher(), **old))
    assert message.startswith(spelled)
    assert "from lightning_distill import TeacherRunner" in message and "removed in the next release" in message
    new_style = DistillationCallback(TeacherRunner(seeded_teacher(), **new))
    for attribute in ("checkpoint", "logits_layer", "precision", "device", "sharding", "shard_units"):
        assert getattr(old_style.runner, attribute) == getattr(new_style.runner, attribute), attribute
    assert old_style.state_key == new_style.state_key  # old checkpoints still find the callback's state
    for callback in (old_style, new_style):
        make_trainer(tmp_path, callbacks=[callback]).fit(DistillModule(student=tiny_student()), make_loader())
    assert old_style.state_dict() == new_style.state_dict()


def test_teacher_checkpoint_still_loads_the_weights(tmp_path):
    source = TinyTeacher()
    torch.save({"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "t.ckpt")
    callback, message = deprecated(lambda: DistillationCallback(TinyTeacher(), teacher_checkpoint=tmp_path / "t.ckpt"))
    path = str(tmp_path / "t.ckpt")
    assert message.startswith(
        f"`DistillationCallback(teacher, teacher_checkpoint={path!r})` is deprecated: pass "
        f"`DistillationCallback(TeacherRunner(teacher, checkpoint={path!r}))`"
    )
    for loaded, saved in zip(callback.teacher.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(loaded, saved)
    assert callback.state_dict()["teacher_checkpoint"] == path
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"), pytest.warns(DeprecationWarning):
        DistillationCallback(TinyTeacher(), teacher_checkpoint=tmp_path / "nope.ckpt")


def test_logits_layer_still_takes_the_pre_softmax_output():
    teacher = SoftmaxTeacher()
    callback, _ = deprecated(lambda: DistillationCallback(teacher, logits_layer="head"))
    x, _ = next(iter(make_loader()))
    with torch.no_grad():
        torch.testing.assert_close(callback.runner.run(x).logits, teacher.head(teacher.body(x)))


def test_teacher_precision_and_device_still_place_the_teacher(tmp_path):
    callback, _ = deprecated(
        lambda: DistillationCallback(TinyTeacher(), teacher_precision="bf16", teacher_device="cpu")
    )
    make_trainer(tmp_path, callbacks=[callback]).fit(DistillModule(student=tiny_student()), make_loader())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in callback.teacher.parameters())
    assert callback.state_dict()["teacher_precision"] == "bf16" and callback.state_dict()["teacher_device"] == "cpu"


def test_teacher_sharding_shard_is_still_refused_on_one_device(tmp_path):
    callback, _ = deprecated(lambda: DistillationCallback(TinyTeacher(), teacher_sharding="shard"))
    with pytest.raises(ValueError, match="the Trainer's strategy is SingleDeviceStrategy"):
        make_trainer(tmp_path, callbacks=[callback]).fit(DistillModule(student=tiny_student()), make_loader())


def test_teachers_and_weights_still_build_the_mixture(tmp_path):
    torch.manual_seed(0)
    a, b = TinyTeacher(), TinyTeacher()
    callback, message = deprecated(
        lambda: DistillationCallback(teachers={"a": a, "b": b}, weights={"a": 1.0, "b": 3.0})
    )
    assert message.startswith(
        "`DistillationCallback(teachers={'a': ..., 'b': ...}, weights={'a': 1.0, 'b': 3.0})` is deprecated: pass "
        "`DistillationCallback(TeacherMixture({'a': ..., 'b': ...}, weights={'a': 1.0, 'b': 3.0}))` "
        "(`from lightning_distill import TeacherMixture`)"
    )
    mixture = callback.teacher
    assert isinstance(mixture, TeacherMixture) and mixture.weights == {"a": 0.25, "b": 0.75}
    assert mixture.teachers == {"a": a, "b": b}
    new_style = DistillationCallback(TeacherMixture({"a": a, "b": b}, weights={"a": 1.0, "b": 3.0}))
    assert callback.state_key == new_style.state_key
    trainer = make_trainer(tmp_path, callbacks=[callback])
    trainer.fit(DistillModule(student=tiny_student(), alpha=0.5, temperature=2.0), make_loader())
    assert torch.isfinite(trainer.callback_metrics["train/kd_loss"])


def test_teachers_with_a_placement_keyword_spell_both_objects():
    _, message = deprecated(
        lambda: DistillationCallback(teachers={"a": TinyTeacher(), "b": TinyTeacher()}, teacher_device="cpu")
    )
    assert message.startswith(
        "`DistillationCallback(teachers={'a': ..., 'b': ...}, teacher_device='cpu')` is deprecated: pass "
        "`DistillationCallback(TeacherRunner(TeacherMixture({'a': ..., 'b': ...}), device='cpu'))` "
        "(`from lightning_distill import TeacherMixture, TeacherRunner`)"
    )


def test_the_new_spellings_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        DistillationCallback(TinyTeacher())
        DistillationCallback(TeacherRunner(TinyTeacher(), device="cpu", precision="bf16", sharding="replicate"))
        DistillationCallback(TeacherMixture({"a": TinyTeacher(), "b": TinyTeacher()}))
