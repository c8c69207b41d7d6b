"""Bad inputs to the losses: each once passed silently or was refused only at the first step (issue 17, item 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_distill import DistillModule
from lightning_distill.losses.functional import distillation_loss_terms, kd_loss
from tests.helpers.tiny import tiny_student


def _logits(n: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, classes, generator=g), torch.randn(n, classes, generator=g)


@pytest.mark.parametrize("bad", [4, -1])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_kd_loss_refuses_a_target_outside_the_classes_chunked_or_not(bad, chunk_size):
    # the chunked path used the target only to select positions and let class 4 of 4 (or -1) through
    s, t = _logits()
    target = torch.tensor([0, 1, bad, 3, 0, 1])
    with pytest.raises(ValueError, match=rf"`target` holds class index {bad}, outside \[0, 4\) for 4 classes"):
        kd_loss(s, t, temperature=2.0, target=target, chunk_size=chunk_size)
    # ignored and masked-out positions are not classes and may hold anything
    ignored = torch.tensor([0, 1, -100, 3, 0, 1])
    mask = torch.tensor([True, True, False, True, True, True])
    for kwargs in ({"target": ignored}, {"target": target, "mask": mask}):
        chunked = kd_loss(s, t, temperature=2.0, chunk_size=chunk_size, **kwargs)
        torch.testing.assert_close(chunked, kd_loss(s[mask], t[mask], temperature=2.0))


@pytest.mark.parametrize(
    ("alpha", "temperature"),
    [(np.float32(0.25), np.float64(2.0)), (np.float64(0.25), np.int64(2)), (torch.tensor(0.25), torch.tensor(2.0))],
    ids=["numpy-float", "numpy-int", "0d-tensor"],
)
def test_numpy_and_0d_tensor_scalars_are_numbers_for_the_functional_losses(alpha, temperature):
    # DistillModule accepted them while the functional losses called them invalid
    s, t = _logits()
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    expected = distillation_loss_terms(s, t, target, alpha=0.25, temperature=2.0)
    got = distillation_loss_terms(s, t, target, alpha=alpha, temperature=temperature)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    torch.testing.assert_close(kd_loss(s, t, temperature=temperature), kd_loss(s, t, temperature=2.0))
    DistillModule(student=tiny_student(), alpha=alpha, temperature=temperature)


@pytest.mark.parametrize("bad", [True, np.bool_(True), torch.tensor([2.0]), torch.tensor(2.0 + 0j), "2.0"])
def test_what_is_not_one_real_number_is_still_refused(bad):
    s, t = _logits()
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0, got"):
        kd_loss(s, t, temperature=bad)


def test_dkd_with_chunking_is_refused_when_the_module_is_built():
    # it was refused only at the first training step, after the Trainer had set everything up
    with pytest.raises(ValueError, match=r"`kd_chunk_size=4` is not supported with divergence='dkd'"):
        DistillModule(student=tiny_student(), divergence="dkd", kd_chunk_size=4)
