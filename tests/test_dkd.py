"""Tests of decoupled KD (``divergence="dkd"``, ``dkd_loss``) against the mdistiller-style reference."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_distill.losses import DistillationLoss, Divergence, KDLoss
from lightning_distill.losses.functional import (
    check_divergence,
    check_weight,
    cross_entropy,
    distillation_loss,
    distillation_loss_terms,
    dkd_loss,
    kd_loss,
)
from tests.helpers.dkd_reference import dkd_reference, dkd_reference_terms
from tests.helpers.tiny import random_logits


# ---------------------------------------------------------------------------------------------------------------------
# Against the official-code reference (float64)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 3, 10])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize(("tckd_weight", "nckd_weight"), [(1.0, 8.0), (0.5, 2.0), (0.0, 1.0), (2.0, 0.0)])
def test_matches_mdistiller_reference(
    num_classes: int, temperature: float, tckd_weight: float, nckd_weight: float
) -> None:
    student, teacher, target, _ = random_logits((16, num_classes), seed=num_classes, dtype=torch.float64)
    tckd_ref, nckd_ref = dkd_reference_terms(student, teacher, target, temperature)
    expected = dkd_reference(student, teacher, target, tckd_weight, nckd_weight, temperature)
    weights: dict[str, Any] = {"tckd_weight": tckd_weight, "nckd_weight": nckd_weight}

    value = dkd_loss(student, teacher, target, temperature=temperature, **weights)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    via_kd = kd_loss(student, teacher, temperature=temperature, divergence="dkd", target=target, **weights)
    assert torch.equal(via_kd, value)
    terms = distillation_loss_terms(
        student, teacher, target, alpha=1.0, temperature=temperature, divergence="dkd", **weights
    )
    torch.testing.assert_close(terms["tckd_loss"], tckd_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["nckd_loss"], nckd_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(terms["kd_loss"], value)


def test_float32_matches_reference() -> None:
    student, teacher, target, _ = random_logits((32, 100), seed=1, scale=5.0)
    expected = dkd_reference(student.double(), teacher.double(), target, 1.0, 8.0, 4.0)
    value = dkd_loss(student, teacher, target, temperature=4.0)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_two_classes_give_exactly_zero_nckd() -> None:
    student, teacher, target, _ = random_logits((12, 2), seed=2, dtype=torch.float64)
    terms = distillation_loss_terms(student, teacher, target, alpha=1.0, temperature=3.0, divergence="dkd")
    assert terms["nckd_loss"].item() == 0.0
    assert terms["tckd_loss"].item() > 0.0
    assert torch.equal(terms["kd_loss"], 1.0 * terms["tckd_loss"])
    # with two classes the binary distribution is the whole distribution: TCKD is plain KL
    torch.testing.assert_close(terms["tckd_loss"], kd_loss(student, teacher, temperature=3.0))


def test_kl_decomposes_into_tckd_and_coupled_nckd() -> None:
    # The paper's identity, row by row: KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD.
    student, teacher, target, _ = random_logits((8, 7), seed=3, dtype=torch.float64)
    temperature = 2.0
    p_target = F.softmax(teacher / temperature, dim=-1).gather(1, target[:, None]).squeeze(1)
    for i in range(8):
        rows = slice(i, i + 1)
        terms = distillation_loss_terms(
            student[rows], teacher[rows], target[rows], alpha=1.0, temperature=temperature, divergence="dkd"
        )
        kl = kd_loss(student[rows], teacher[rows], temperature=temperature)
        torch.testing.assert_close(kl, terms["tckd_loss"] + (1 - p_target[i]) * terms["nckd_loss"])


# ---------------------------------------------------------------------------------------------------------------------
# Token logits, masks, ignore_index
# ---------------------------------------------------------------------------------------------------------------------
def test_token_logits_with_mask_and_ignore_index_equal_reference_on_selected_rows() -> None:
    student, teacher, target, mask = random_logits((3, 5, 11), seed=4)
    target.view(-1)[::4] = -1  # ignored positions, with a non-default ignore_index
    counted = mask & (target != -1)
    tckd_ref, nckd_ref = dkd_reference_terms(student[counted].double(), teacher[counted].double(), target[counted], 2.0)
    kwargs: dict[str, Any] = {
        "temperature": 2.0,
        "tckd_weight": 1.5,
        "nckd_weight": 4.0,
        "mask": mask,
        "ignore_index": -1,
    }

    value = dkd_loss(student, teacher, target, **kwargs)
    assert value.item() == pytest.approx((1.5 * tckd_ref + 4.0 * nckd_ref).item(), rel=1e-5)
    assert torch.equal(kd_loss(student, teacher, divergence="dkd", target=target, **kwargs), value)
    terms = distillation_loss_terms(student, teacher, target, alpha=0.6, divergence="dkd", **kwargs)
    assert terms["tckd_loss"].item() == pytest.approx(tckd_ref.item(), rel=1e-5)
    assert terms["nckd_loss"].item() == pytest.approx(nckd_ref.item(), rel=1e-5)
    ce = cross_entropy(student, target, mask=mask, ignore_index=-1)
    torch.testing.assert_close(terms["task_loss"], ce)
    torch.testing.assert_close(terms["loss"], 0.6 * value + 0.4 * ce)
    # (B, L, V) equals the flattened (B*L, V) rows
    flat = dkd_loss(
        student.reshape(15, 11), teacher.reshape(15, 11), target.reshape(15), **{**kwargs, "mask": mask.reshape(15)}
    )
    torch.testing.assert_close(flat, value)


def test_uncounted_positions_do_not_matter() -> None:
    student, teacher, target, mask = random_logits((3, 5, 11), seed=5)
    target[~mask] = -100
    target[0, 0], mask[0, 0] = -100, True  # counted by the mask, dropped by ignore_index

    def run(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = s.clone().requires_grad_(True)
        loss = distillation_loss(s, t, target, alpha=0.7, temperature=2.0, divergence="dkd", mask=mask)
        loss.backward()
        assert s.grad is not None
        return loss.detach(), s.grad

    loss, grad = run(student, teacher)
    counted = mask & (target != -100)
    assert torch.all(grad[~counted] == 0)
    assert grad[counted].abs().sum() > 0
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~counted] = float("nan")
    noisy_teacher[~counted] = 1e4
    loss2, grad2 = run(noisy_student, noisy_teacher)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad, grad2)


def test_no_counted_position_gives_connected_zero() -> None:
    student, teacher, target, _ = random_logits((3, 4, 7), seed=6)
    student.requires_grad_(True)
    none = torch.zeros(3, 4, dtype=torch.bool)
    cases = [
        dkd_loss(student, teacher, target, mask=none),
        dkd_loss(student, teacher, torch.full_like(target, -100)),
        *distillation_loss_terms(student, teacher, target, divergence="dkd", mask=none).values(),
    ]
    for value in cases:
        assert value.item() == 0.0
        assert value.requires_grad
        (grad,) = torch.autograd.grad(value, student, retain_graph=True)
        assert torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------------------------------------------------------------
# Numerics and gradients
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 5])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_identical_logits_give_exactly_zero(num_classes: int, temperature: float) -> None:
    logits, _, target, _ = random_logits((4, 6, num_classes), seed=7, scale=20.0)
    value = dkd_loss(logits, logits.clone(), target, temperature=temperature)
    assert value.item() == 0.0
    terms = distillation_loss_terms(logits, logits.clone(), target, alpha=1.0, divergence="dkd")
    assert terms["tckd_loss"].item() == 0.0 and terms["nckd_loss"].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_large_logits_finite_and_non_negative(dtype: torch.dtype) -> None:
    student, teacher, target, _ = random_logits((16, 50), seed=8, scale=500.0, dtype=dtype)
    student.requires_grad_(True)
    value = dkd_loss(student, teacher, target, temperature=1.0)
    assert value.dtype == torch.float32
    assert torch.isfinite(value) and value.item() >= 0.0
    value.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    almost = (teacher.float() + 1e-3).to(dtype)
    terms = distillation_loss_terms(almost, teacher, target, alpha=1.0, divergence="dkd")
    assert all(terms[name].item() >= 0.0 for name in ("kd_loss", "tckd_loss", "nckd_loss"))


def test_bf16_matches_float32_computation() -> None:
    student, teacher, target, _ = random_logits((8, 20), seed=9, dtype=torch.bfloat16)
    torch.testing.assert_close(
        dkd_loss(student, teacher, target, temperature=4.0),
        dkd_loss(student.float(), teacher.float(), target, temperature=4.0),
    )


def test_minus_inf_logits_give_no_nan() -> None:
    student, teacher, target, _ = random_logits((6, 5), seed=10, dtype=torch.float64)
    target[:] = torch.tensor([0, 1, 2, 4, 0, 1])
    teacher[:, 3] = -math.inf  # a masked, never-target class
    student.requires_grad_(True)
    value = dkd_loss(student, teacher, target, temperature=2.0)
    value.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    expected = dkd_reference(student.detach(), teacher, target, 1.0, 8.0, 2.0)
    torch.testing.assert_close(value.detach(), expected)
    # every non-target teacher logit -inf (teacher certain of the target); with C = 2 as well
    for num_classes in (2, 4):
        s = torch.randn(3, num_classes, dtype=torch.float64, requires_grad=True)
        t = torch.full((3, num_classes), -math.inf, dtype=torch.float64)
        t[:, 0] = 0.0
        loss = dkd_loss(s, t, torch.zeros(3, dtype=torch.long))
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("num_classes", [2, 5])
def test_gradcheck_float64(num_classes: int) -> None:
    student, teacher, target, mask = random_logits((2, 3, num_classes), seed=11, scale=1.5, dtype=torch.float64)
    target[0, 0] = -100
    student.requires_grad_(True)
    teacher.requires_grad_(True)

    def dkd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return dkd_loss(s, t, target, temperature=2.0, tckd_weight=1.5, nckd_weight=3.0, mask=mask)

    def total(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return distillation_loss(s, t, target, alpha=0.3, temperature=1.5, divergence="dkd", mask=mask)

    assert torch.autograd.gradcheck(dkd, (student, teacher))
    assert torch.autograd.gradcheck(total, (student, teacher))


def test_gradients_finite_and_match_reference() -> None:
    student, teacher, target, _ = random_logits((10, 9), seed=12, dtype=torch.float64)
    ours = student.clone().requires_grad_(True)
    theirs = student.clone().requires_grad_(True)
    dkd_loss(ours, teacher, target, temperature=4.0).backward()
    dkd_reference(theirs, teacher, target, 1.0, 8.0, 4.0).backward()
    assert ours.grad is not None and theirs.grad is not None
    assert torch.isfinite(ours.grad).all()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Composition, other divergences, module twins
# ---------------------------------------------------------------------------------------------------------------------
def test_distillation_loss_terms_returns_the_two_parts() -> None:
    student, teacher, target, _ = random_logits((6, 5), seed=13)
    terms = distillation_loss_terms(
        student, teacher, target, alpha=0.9, temperature=4.0, divergence="dkd", tckd_weight=2.0, nckd_weight=3.0
    )
    assert list(terms) == ["loss", "task_loss", "kd_loss", "tckd_loss", "nckd_loss"]
    torch.testing.assert_close(terms["kd_loss"], 2.0 * terms["tckd_loss"] + 3.0 * terms["nckd_loss"])
    torch.testing.assert_close(terms["task_loss"], cross_entropy(student, target))
    torch.testing.assert_close(terms["loss"], 0.9 * terms["kd_loss"] + 0.1 * terms["task_loss"])
    loss = distillation_loss(
        student, teacher, target, alpha=0.9, temperature=4.0, divergence="dkd", tckd_weight=2.0, nckd_weight=3.0
    )
    assert torch.equal(loss, terms["loss"])
    assert list(distillation_loss_terms(student, teacher, target)) == ["loss", "task_loss", "kd_loss"]


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "soft_ce", "js", "mse"])
def test_other_divergences_use_target_only_for_ignore_index(divergence: Divergence) -> None:
    student, teacher, target, mask = random_logits((3, 4, 7), seed=14)
    target[0] = -100
    with_target = kd_loss(student, teacher, temperature=2.0, divergence=divergence, mask=mask, target=target)
    torch.testing.assert_close(
        with_target, kd_loss(student[1:], teacher[1:], temperature=2.0, divergence=divergence, mask=mask[1:])
    )
    expected = distillation_loss_terms(student, teacher, target, alpha=0.5, temperature=2.0, divergence=divergence)
    assert torch.equal(
        kd_loss(student, teacher, temperature=2.0, divergence=divergence, target=target), expected["kd_loss"]
    )
    # the DKD weights are validated but do not change the other divergences
    weighted = distillation_loss_terms(
        student, teacher, target, temperature=2.0, divergence=divergence, tckd_weight=5.0, nckd_weight=0.0
    )
    assert all(torch.equal(weighted[name], expected[name]) for name in expected) and set(weighted) == set(expected)


def test_module_twins_equal_functions() -> None:
    student, teacher, target, mask = random_logits((3, 4, 7), seed=15)
    kd_module = KDLoss(temperature=3.0, divergence="dkd", tckd_weight=0.5, nckd_weight=6.0)
    expected_kd = kd_loss(
        student, teacher, temperature=3.0, divergence="dkd", mask=mask, target=target, tckd_weight=0.5, nckd_weight=6.0
    )
    assert torch.equal(kd_module(student, teacher, mask, target), expected_kd)
    assert torch.equal(
        kd_module(student, teacher, target=target),
        dkd_loss(student, teacher, target, temperature=3.0, tckd_weight=0.5, nckd_weight=6.0),
    )
    module = DistillationLoss(alpha=0.8, temperature=3.0, divergence="dkd", ignore_index=1, tckd_weight=0.5)
    expected = distillation_loss_terms(
        student,
        teacher,
        target,
        alpha=0.8,
        temperature=3.0,
        divergence="dkd",
        mask=mask,
        ignore_index=1,
        tckd_weight=0.5,
    )
    assert torch.equal(module(student, teacher, target, mask=mask), expected["loss"])
    got = module.terms(student, teacher, target, mask=mask)
    assert list(got) == list(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_module_repr_shows_dkd_weights_only_for_dkd() -> None:
    assert repr(KDLoss(divergence="kl", nckd_weight=2.0)) == "KDLoss(temperature=1.0, divergence='kl')"
    assert (
        repr(KDLoss(temperature=4, divergence="dkd", nckd_weight=2))
        == "KDLoss(temperature=4.0, divergence='dkd', tckd_weight=1.0, nckd_weight=2.0)"
    )
    assert repr(DistillationLoss(divergence="dkd", tckd_weight=0)) == (
        "DistillationLoss(alpha=0.5, temperature=1.0, divergence='dkd', tckd_weight=0.0, nckd_weight=8.0, "
        "ignore_index=-100)"
    )
    assert (
        repr(DistillationLoss(divergence="js"))
        == "DistillationLoss(alpha=0.5, temperature=1.0, divergence='js', ignore_index=-100)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------
def test_missing_target_raises_with_hint() -> None:
    logits = torch.zeros(4, 5)
    match = r"`divergence='dkd'` needs `target`.*HINT: pass `target=`"
    with pytest.raises(ValueError, match=match):
        kd_loss(logits, logits, divergence="dkd")
    with pytest.raises(ValueError, match=match):
        distillation_loss_terms(logits, logits, None, alpha=1.0, divergence="dkd")
    with pytest.raises(ValueError, match=match):
        distillation_loss(logits, logits, None, alpha=0.5, divergence="dkd")
    with pytest.raises(ValueError, match=match):
        dkd_loss(logits, logits, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        KDLoss(divergence="dkd")(logits, logits)
    with pytest.raises(ValueError, match=match):
        DistillationLoss(alpha=1.0, divergence="dkd")(logits, logits)


@pytest.mark.parametrize("weight", [-1.0, -1e-9, float("nan"), float("inf"), True, "8", None])
@pytest.mark.parametrize("name", ["tckd_weight", "nckd_weight"])
def test_bad_weight(name: str, weight: object) -> None:
    match = f"`{name}` must be a finite number >= 0, got " + repr(weight).replace("'", ".")
    with pytest.raises(ValueError, match=match):
        check_weight(name, weight)  # type: ignore[arg-type]
    logits, target = torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=f"`{name}`"):
        dkd_loss(logits, logits, target, **{name: weight})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"`{name}`"):
        kd_loss(logits, logits, divergence="dkd", target=target, **{name: weight})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"`{name}`"):
        distillation_loss(logits, logits, target, **{name: weight})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"`{name}`"):
        KDLoss(**{name: weight})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"`{name}`"):
        DistillationLoss(divergence="dkd", **{name: weight})  # type: ignore[arg-type]


def test_good_weights_pass_through() -> None:
    assert check_weight("w", 0) == 0.0
    assert check_weight("w", 8) == 8.0
    assert check_weight("w", np.float64(2.5)) == 2.5
    assert check_divergence("dkd") == "dkd"


def test_single_class_is_an_error() -> None:
    logits, target = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    match = r"needs at least 2 classes.*got logits with 1 class"
    with pytest.raises(ValueError, match=match):
        dkd_loss(logits, logits, target)
    with pytest.raises(ValueError, match=match):
        distillation_loss(logits, logits, target, divergence="dkd")
    with pytest.raises(ValueError, match=match):
        kd_loss(logits, logits, divergence="dkd", target=target)


def test_bad_target_andrandom_logits() -> None:
    logits = torch.zeros(8, 10)
    with pytest.raises(ValueError, match=r"class index 10, outside \[0, 10\).*HINT.*ignore_index"):
        dkd_loss(logits, logits, torch.full((8,), 10))
    with pytest.raises(ValueError, match=r"integer tensor of class indices, got dtype torch.float32"):
        dkd_loss(logits, logits, torch.zeros(8))
    with pytest.raises(ValueError, match=r"`target` must have the logits' leading shape \(8,\)"):
        kd_loss(logits, logits, divergence="dkd", target=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class counts differ \(10 vs 12\)"):
        dkd_loss(logits, torch.zeros(8, 12), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`mask` must be a bool tensor"):
        dkd_loss(logits, logits, torch.zeros(8, dtype=torch.long), mask=torch.ones(8))
    with pytest.raises(ValueError, match="`temperature`"):
        dkd_loss(logits, logits, torch.zeros(8, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match=r"`ignore_index` must be an int"):
        dkd_loss(logits, logits, torch.zeros(8, dtype=torch.long), ignore_index=None)  # type: ignore[arg-type]


def test_unknown_divergence_message_mentions_dkd() -> None:
    with pytest.raises(ValueError, match=r"one of .*'dkd' \('dkd' needs class targets\), got 'DKD'"):
        check_divergence("DKD")
