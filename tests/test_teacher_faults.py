"""Teachers under faults that once failed silently or with a bare error (issue 17, item 5).

A softmax teacher, a checkpoint holding two models, an empty or truncated checkpoint, a teacher on the ``meta``
device, and a precision conversion that rounded the caller's teacher in place.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_distill import DistillationCallback, Distiller, DistillModule
from lightning_distill.teacher import TeacherRunner
from tests.helpers.tiny import (
    IN_DIM,
    NUM_CLASSES,
    SoftmaxTeacher,
    TinyTeacher,
    make_data,
    make_loader,
    make_trainer,
    tiny_student,
)


def _fit(tmp_path, teacher, **trainer_kwargs) -> DistillationCallback:
    callback = teacher if isinstance(teacher, DistillationCallback) else DistillationCallback(teacher)
    trainer = make_trainer(tmp_path, limit_val_batches=0, callbacks=[callback], **trainer_kwargs)
    trainer.fit(DistillModule(student=tiny_student(), alpha=0.5, temperature=2.0), make_loader())
    return callback


# ---------------------------------------------------------------------------------- 1. probabilities, not logits
class TokenSoftmaxTeacher(nn.Module):
    """Per-token ``(B, L, V)`` outputs: probabilities (``log=False``) or log-probabilities (``log=True``)."""

    def __init__(self, log: bool) -> None:
        super().__init__()
        self.embed, self.log = nn.Embedding(11, 7), log

    def forward(self, ids: Tensor) -> Tensor:
        logits = self.embed(ids)
        return logits.log_softmax(-1) if self.log else logits.softmax(-1)


def test_a_teacher_that_returns_probabilities_is_refused_with_the_fix(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"The teacher returns probabilities, not logits: on its first batch every row of the teacher's output, "
        r"shape \(16, 4\), is non-negative and sums to 1 .* near-uniform target\. HINT: pass `TeacherRunner\(teacher, "
        r"logits_layer='<the layer before the softmax>'\)`, or remove the final Softmax",
    ):
        _fit(tmp_path, SoftmaxTeacher())
    # an nn.Softmax layer is named, with the layer before it as the logits layer to pass; which then trains
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(IN_DIM, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES), nn.Softmax(-1))
    with pytest.raises(ValueError, match=r"its layer '3' is an nn\.Softmax, after '2'.*logits_layer='2'\)`"):
        _fit(tmp_path, sequential)
    _fit(tmp_path, TeacherRunner(sequential, logits_layer="2"))
    # Distiller runs the teacher through the same runner, so it refuses it too
    student, distiller = tiny_student(), Distiller(SoftmaxTeacher(), alpha=0.5)
    distiller.on_train_begin(student)
    x, y = make_data(8)
    with pytest.raises(ValueError, match="The teacher returns probabilities, not logits"):
        distiller.loss(x, student(x), y)
    # per-token probabilities are refused; log-probabilities are logits (softmax-invariant) and pass
    ids = torch.randint(0, 11, (2, 5))
    with pytest.raises(ValueError, match=r"shape \(2, 5, 7\), is non-negative and sums to 1"):
        TeacherRunner(TokenSoftmaxTeacher(log=False)).run(ids)
    assert TeacherRunner(TokenSoftmaxTeacher(log=True)).run(ids).logits.shape == (2, 5, 7)


# ------------------------------------------------------------------------------ 2. a checkpoint with two models
def test_a_checkpoint_holding_two_matching_models_is_refused_until_one_is_chosen(tmp_path):
    torch.manual_seed(0)
    student_like, teacher = TinyTeacher(), TinyTeacher()  # the same architecture: both prefixes match
    state = {f"student.{k}": v for k, v in student_like.state_dict().items()}
    state |= {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    path = tmp_path / "both.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(
        ValueError,
        match=r"holds 2 models whose keys all match the teacher \(TinyTeacher\), under the prefixes 'student\.', "
        r"'teacher\.'.*HINT: choose one: `TeacherRunner\(teacher, checkpoint='.*both\.ckpt', "
        r"checkpoint_prefix='teacher\.'\)`",
    ):
        TeacherRunner(TinyTeacher(), checkpoint=path)
    runner = TeacherRunner(TinyTeacher(), checkpoint=path, checkpoint_prefix="teacher")  # the "." is implied
    assert runner.checkpoint_prefix == "teacher."
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in runner.teacher.state_dict().items())
    ema = tmp_path / "ema.ckpt"
    torch.save({f"{p}.{k}": v for p in ("model", "ema_model") for k, v in teacher.state_dict().items()}, ema)
    with pytest.raises(ValueError, match=r"under the prefixes 'ema_model\.', 'model\.'.*checkpoint_prefix="):
        TeacherRunner(TinyTeacher(), checkpoint=ema)
    # the teacher's own keys beside a prefixed copy: ambiguous too; "" takes the unprefixed ones
    beside = tmp_path / "beside.ckpt"
    torch.save(teacher.state_dict() | {f"student.{k}": v for k, v in student_like.state_dict().items()}, beside)
    with pytest.raises(ValueError, match=r"under the prefixes '' \(no prefix\), 'student\.'"):
        TeacherRunner(TinyTeacher(), checkpoint=beside)
    runner = TeacherRunner(TinyTeacher(), checkpoint=beside, checkpoint_prefix="")
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in runner.teacher.state_dict().items())
    with pytest.raises(ValueError, match=r"no key under `checkpoint_prefix='net\.'`; its keys start with \['ema_model"):
        TeacherRunner(TinyTeacher(), checkpoint=ema, checkpoint_prefix="net.")
    with pytest.raises(ValueError, match=r"`checkpoint_prefix='teacher\.'` selects .* but no `checkpoint` is given"):
        TeacherRunner(TinyTeacher(), checkpoint_prefix="teacher.")
    with pytest.raises(ValueError, match=r"`checkpoint_prefix` must be a key prefix such as 'teacher\.'.*got '\.'"):
        TeacherRunner(TinyTeacher(), checkpoint=ema, checkpoint_prefix=".")


# ----------------------------------------------------------------------- 3. empty, truncated or foreign files
def test_an_empty_or_truncated_checkpoint_names_the_file_and_what_is_wrong(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"The teacher checkpoint '.*empty\.ckpt' is empty \(0 bytes\).*HINT: save"):
        TeacherRunner(TinyTeacher(), checkpoint=empty)
    whole = tmp_path / "whole.ckpt"
    torch.save(TinyTeacher().state_dict(), whole)
    data = whole.read_bytes()
    for name, content in (("truncated.ckpt", data[: len(data) // 2]), ("junk.ckpt", b"\x80\x02not a checkpoint")):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(
            ValueError,
            match=rf"The teacher checkpoint '.*{name}' \({len(content)} bytes\) could not be read \(\w+.*\): the file "
            r"is truncated .* or is not a PyTorch checkpoint\. HINT",
        ) as caught:
            TeacherRunner(TinyTeacher(), checkpoint=bad)
        assert caught.value.__cause__ is not None  # the original error is chained


# ---------------------------------------------------------------------------------- 4. a teacher on the meta device
def test_a_teacher_on_the_meta_device_is_refused_at_setup_with_the_fix(tmp_path):
    with torch.device("meta"):
        teacher = TinyTeacher()
    callback = DistillationCallback(teacher)  # construction works: the check waits for setup
    with pytest.raises(
        ValueError,
        match=r"The teacher's weights were never materialized: 4 of its 4 parameters and buffers are on the `meta` "
        r"device \(\['body\.0\.weight', .*`torch\.device\('meta'\)` or accelerate's `init_empty_weights\(\)`.*HINT: "
        r"load real weights: .*`teacher\.to_empty\(device='cpu'\)` followed by `teacher\.load_state_dict\(state\)`",
    ):
        _fit(tmp_path, callback)
    distiller = Distiller(teacher, alpha=0.5)
    with pytest.raises(ValueError, match="never materialized"):
        distiller.on_train_begin(tiny_student())
    # a checkpoint gives a meta teacher its weights
    real = TinyTeacher()
    torch.save(real.state_dict(), tmp_path / "real.pt")
    with torch.device("meta"):
        empty = TinyTeacher()
    runner = TeacherRunner(empty, checkpoint=tmp_path / "real.pt")
    x = make_data(4)[0]
    torch.testing.assert_close(runner.run(x).logits, real(x).detach())
    assert not any(p.requires_grad for p in runner.teacher.parameters())


# ------------------------------------------------------------------------- 5. precision never rounds the original
@pytest.mark.parametrize(
    ("runner_kwargs", "trainer_kwargs"), [({"precision": "bf16"}, {}), ({}, {"precision": "bf16-true"})]
)
def test_a_precision_conversion_leaves_the_callers_teacher_in_float32(tmp_path, runner_kwargs, trainer_kwargs):
    torch.manual_seed(0)
    teacher = TinyTeacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    callback = _fit(tmp_path, TeacherRunner(teacher, **runner_kwargs), **trainer_kwargs)
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert callback.teacher is not teacher  # the runner converted its own copy ...
    assert all(p.dtype == torch.bfloat16 for p in callback.teacher.parameters())  # ... which runs in bf16
    assert not any(p.requires_grad for p in callback.teacher.parameters())
