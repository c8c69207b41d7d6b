"""Feature maps under faults that once failed badly or silently (issue 17, item 6): bf16-true, shared layers, widths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_distill import DistillationCallback, DistillModule, FeatureMap
from lightning_distill.features import FeatureCapture
from tests.helpers.tiny import IN_DIM, NUM_CLASSES, TinyTeacher, make_loader, make_trainer, tiny_student


class LossRecorder(DistillModule):
    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss


def test_a_feature_map_trains_under_bf16_true(tmp_path):
    # the teacher (converted to bf16) was probed in setup with the float32 batch: "mat1 and mat2 must have the same
    # dtype"; the setup probe now gets the batch as the precision plugin gives it to every training step
    torch.manual_seed(0)
    module = LossRecorder(
        student=tiny_student(), alpha=0.5, temperature=2.0, feature_maps=[FeatureMap("1", "body.1", weight=0.5)]
    )
    module.losses = []
    trainer = make_trainer(tmp_path, precision="bf16-true", callbacks=[DistillationCallback(TinyTeacher())])
    trainer.fit(module, make_loader())
    assert len(module.losses) == 2 and all(math.isfinite(loss) for loss in module.losses)
    assert module.projectors["1"].weight.dtype == torch.bfloat16  # a Linear 6 -> 16


class SharedReLU(nn.Module):
    """One ``nn.ReLU`` object used after both hidden layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(IN_DIM, 6), nn.Linear(6, 6), nn.Linear(6, NUM_CLASSES)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


def test_a_layer_that_runs_twice_in_one_forward_is_refused_not_half_captured():
    # only the second call's output was kept, silently
    capture = FeatureCapture(role="student")
    capture.add("act")
    model = SharedReLU()
    capture.attach(model)
    with capture.recording():
        model(torch.randn(2, IN_DIM))
    with pytest.raises(RuntimeError, match=r"student's layers \['act'\] ran more than once while recording.*nn.ReLU"):
        capture.take()
    with capture.recording():  # a later recording starts afresh
        model.act(torch.randn(2, 6))
    assert capture.take()["act"].shape == (2, 6)


def test_a_shared_layer_fails_in_setup_of_a_fit(tmp_path):
    module = DistillModule(student=SharedReLU(), alpha=0.5, feature_maps=[FeatureMap("act", "body.1")])
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())])
    with pytest.raises(RuntimeError, match=r"\['act'\] ran more than once"):
        trainer.fit(module, make_loader())


@pytest.mark.parametrize(
    ("fmap", "match"),
    [
        (
            # the student's layer is 6 wide
            FeatureMap("1", "body.1", projector="linear", student_dim=5, teacher_dim=16),
            r"Feature map '1': its projector maps 5 -> 16 features along the last dimension, but the student's "
            r"feature has shape \(16, 6\) and the teacher's \(16, 16\) \(6 -> 16\)",
        ),
        (
            FeatureMap("1", "body.1", projector="linear", student_dim=6, teacher_dim=12),
            r"maps 6 -> 12 features .* \(6 -> 16\).*`student_dim` / `teacher_dim`",
        ),
    ],
)
def test_given_widths_that_disagree_with_the_layers_are_named_in_setup(tmp_path, fmap, match):
    # they were not checked against the real shapes: a bare matmul error at the first step
    module = DistillModule(student=tiny_student(), alpha=0.5, feature_maps=[fmap])
    trainer = make_trainer(tmp_path, callbacks=[DistillationCallback(TinyTeacher())])
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, make_loader())
