"""Which strategies the teacher supports, and when it is sharded (`TeacherRunner(sharding=...)`); the multi-process
runs are in ``test_distributed.py``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch import nn

from lightning_distill import DistillationCallback, DistillModule
from lightning_distill.teacher import TeacherRunner
from lightning_distill.teacher._sharding import AUTO_SHARD_BYTES, module_bytes, resolve_sharding, strategy_kind
from tests.helpers.tiny import TinyTeacher, make_loader, make_trainer, tiny_student


def test_each_lightning_strategy_is_classified_deepspeed_before_its_ddp_base():
    assert strategy_kind(SingleDeviceStrategy(torch.device("cpu"))) == "single"
    assert strategy_kind(DDPStrategy()) == "ddp"
    assert strategy_kind(FSDPStrategy()) == "fsdp"
    assert strategy_kind(ModelParallelStrategy()) == "model_parallel"
    # DeepSpeedStrategy() needs deepspeed installed; classification only looks at the class
    assert strategy_kind(DeepSpeedStrategy.__new__(DeepSpeedStrategy)) == "deepspeed"
    assert strategy_kind(object()) == "untested"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sharding", "kind", "size", "expected"),
    [
        ("auto", "fsdp", AUTO_SHARD_BYTES, True),
        ("auto", "model_parallel", AUTO_SHARD_BYTES - 1, False),
        ("shard", "fsdp", 1, True),
        ("replicate", "model_parallel", 10 * AUTO_SHARD_BYTES, False),
        ("auto", "ddp", 10 * AUTO_SHARD_BYTES, False),
        ("auto", "deepspeed", 10 * AUTO_SHARD_BYTES, False),
        ("replicate", "single", 1, False),
    ],
)
def test_sharding_follows_option_strategy_and_size(sharding, kind, size, expected):
    assert resolve_sharding(sharding, kind, "S", size) is expected


@pytest.mark.parametrize(
    ("kind", "hint"), [("single", "use `strategy='fsdp'`"), ("ddp", "use `strategy='fsdp'`"), ("deepspeed", "ZeRO")]
)
def test_shard_under_a_strategy_that_does_not_shard_is_refused(kind, hint):
    with pytest.raises(ValueError, match=r"needs a sharding strategy .* strategy is MyStrategy\. HINT: .*") as err:
        resolve_sharding("shard", kind, "MyStrategy", 1)
    assert hint in str(err.value)


def test_shard_on_a_single_device_fit_fails_at_setup_naming_the_strategy(tmp_path):
    callback = DistillationCallback(TeacherRunner(TinyTeacher(), sharding="shard"))
    with pytest.raises(ValueError, match="the Trainer's strategy is SingleDeviceStrategy"):
        make_trainer(tmp_path, callbacks=[callback]).fit(DistillModule(student=tiny_student()), make_loader())


def test_auto_replicates_on_a_single_device_and_reports_the_teachers_bytes(tmp_path):
    teacher = TinyTeacher()
    callback = DistillationCallback(teacher)
    make_trainer(tmp_path, callbacks=[callback]).fit(DistillModule(student=tiny_student()), make_loader())
    expected = 4 * sum(p.numel() for p in teacher.parameters())  # float32, no buffers
    assert not callback.teacher_sharded and callback.teacher_bytes == module_bytes(teacher) == expected
    assert callback.state_dict()["teacher_sharded"] is False


def test_an_untested_strategy_is_refused_by_name_unless_allowed():
    module = DistillModule(student=tiny_student())

    class OddStrategy:
        root_device = torch.device("cpu")

    trainer = SimpleNamespace(strategy=OddStrategy())
    with pytest.raises(RuntimeError, match=r"does not support the strategy OddStrategy yet.*allow_untested=True"):
        DistillationCallback(TinyTeacher()).setup(trainer, module, "validate")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(sharding="yes"), ValueError, r"`sharding` must be one of \['auto', 'replicate', 'shard'\], got 'yes'"),
        (dict(sharding="shard", device="cpu"), ValueError, r"cannot also stay on `device='cpu'`\. HINT: drop one"),
        (dict(shard_units=nn.Linear), TypeError, "`shard_units` must be a sequence of nn.Module classes, got <class"),
        (dict(shard_units=["Linear"]), TypeError, r"got \['Linear'\]. HINT: pass the teacher's block class"),
    ],
)
def test_bad_sharding_options_are_explained(kwargs, error, match):
    with pytest.raises(error, match=match):
        TeacherRunner(TinyTeacher(), **kwargs)


def test_sync_dist_must_be_a_bool():
    with pytest.raises(TypeError, match="`sync_dist` must be True or False, got 'yes'"):
        DistillModule(student=tiny_student(), sync_dist="yes")  # type: ignore[arg-type]
