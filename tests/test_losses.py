"""Tests of lightning_distill.losses against closed forms and the independent references in tests/helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_distill.losses import DistillationLoss, Divergence, KDLoss, functional
from lightning_distill.losses.functional import (
    check_alpha,
    check_divergence,
    check_temperature,
    cross_entropy,
    distillation_loss,
    distillation_loss_terms,
    kd_loss,
)
from tests.helpers.reference import (
    inc_kd_loss_reference,
    mnn_distill_loss_reference,
    ref_cross_entropy,
    ref_distillation_loss,
    ref_kd_loss,
)
from tests.helpers.tiny import random_logits

DIVERGENCES: tuple[Divergence, ...] = ("kl", "reverse_kl", "soft_ce", "js", "mse")
SHAPES = [(6, 5), (3, 4, 7)]


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------------------------------
# student softmax = (3/4, 1/4), teacher uniform (1/2, 1/2), mixture m = (5/8, 3/8)
_CLOSED_FORM = {
    "kl": 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25),
    "reverse_kl": 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),
    "soft_ce": -0.5 * math.log(0.75) - 0.5 * math.log(0.25),
    "js": 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375))
    + 0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)),
    "mse": math.log(3.0) ** 2 / 2,
}


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_closed_form_uniform_teacher(divergence: Divergence) -> None:
    student = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    teacher = torch.zeros(1, 2, dtype=torch.float64)
    value = kd_loss(student, teacher, divergence=divergence)
    assert value.item() == pytest.approx(_CLOSED_FORM[divergence], abs=1e-12)
    # Same probabilities at T = 2 from doubled logits: every divergence is scaled by T² = 4; "mse" ignores T but
    # sees logits twice as far apart, so it is 4x as well.
    value_t2 = kd_loss(2 * student, 2 * teacher, temperature=2.0, divergence=divergence)
    assert value_t2.item() == pytest.approx(4 * _CLOSED_FORM[divergence], abs=1e-12)


def test_closed_form_cross_entropy_and_mix() -> None:
    student = torch.tensor([[math.log(3.0), 0.0]])
    teacher = torch.zeros(1, 2)
    target = torch.tensor([0])
    assert cross_entropy(student, target).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    terms = distillation_loss_terms(student, teacher, target, alpha=0.25)
    expected = 0.25 * _CLOSED_FORM["kl"] + 0.75 * -math.log(0.75)
    assert set(terms) == {"loss", "task_loss", "kd_loss"}
    assert terms["loss"].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "js", "mse"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_identical_logits_give_exactly_zero(divergence: Divergence, temperature: float) -> None:
    logits = torch.randn(8, 6, 50) * 20
    assert kd_loss(logits, logits.clone(), temperature=temperature, divergence=divergence).item() == 0.0


def test_soft_ce_is_kl_plus_teacher_entropy() -> None:
    student, teacher, _, _ = random_logits((10, 7), dtype=torch.float64)
    temperature = 2.5
    p_t = F.softmax(teacher / temperature, dim=-1)
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    soft_ce = kd_loss(student, teacher, temperature=temperature, divergence="soft_ce")
    kl = kd_loss(student, teacher, temperature=temperature, divergence="kl")
    torch.testing.assert_close(soft_ce, kl + temperature**2 * entropy)


# ---------------------------------------------------------------------------------------------------------------------
# Against the independent loop reference
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_matches_reference(shape: tuple[int, ...], divergence: Divergence) -> None:
    student, teacher, _, mask = random_logits(shape)
    for m in (None, mask):
        value = kd_loss(student, teacher, temperature=2.0, divergence=divergence, mask=m)
        expected = ref_kd_loss(_np(student), _np(teacher), 2.0, divergence, None if m is None else m.numpy())
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distillation_loss_terms_match_reference(shape: tuple[int, ...], divergence: Divergence) -> None:
    student, teacher, target, mask = random_logits(shape, seed=1)
    target.view(-1)[::3] = -1  # ignored positions, with a non-default ignore_index
    terms = distillation_loss_terms(
        student, teacher, target, alpha=0.7, temperature=3.0, divergence=divergence, mask=mask, ignore_index=-1
    )
    expected = ref_distillation_loss(
        _np(student), _np(teacher), target.numpy(), 0.7, 3.0, divergence, mask.numpy(), ignore_index=-1
    )
    for name in ("loss", "task_loss", "kd_loss"):
        assert terms[name].item() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    loss = distillation_loss(
        student, teacher, target, alpha=0.7, temperature=3.0, divergence=divergence, mask=mask, ignore_index=-1
    )
    assert torch.equal(loss, terms["loss"])


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_matches_reference_and_torch(shape: tuple[int, ...]) -> None:
    student, _, target, mask = random_logits(shape, seed=2)
    target.view(-1)[1::4] = -100
    value = cross_entropy(student, target, mask=mask)
    assert value.item() == pytest.approx(ref_cross_entropy(_np(student), target.numpy(), mask.numpy()), rel=1e-6)
    unmasked = cross_entropy(student, target)
    torch.testing.assert_close(unmasked, F.cross_entropy(student.reshape(-1, shape[-1]), target.reshape(-1)))


def test_ignore_index_removed_from_both_terms() -> None:
    student, teacher, target, _ = random_logits((3, 4, 7), seed=3)
    target[0] = -100
    terms = distillation_loss_terms(student, teacher, target, alpha=0.5)
    torch.testing.assert_close(terms["kd_loss"], kd_loss(student[1:], teacher[1:]))
    torch.testing.assert_close(terms["task_loss"], cross_entropy(student[1:], target[1:]))


def test_alpha_endpoints_and_unlabelled() -> None:
    student, teacher, target, _ = random_logits((6, 5), seed=4)
    kd = kd_loss(student, teacher, temperature=2.0)
    ce = cross_entropy(student, target)
    torch.testing.assert_close(distillation_loss(student, teacher, target, alpha=1.0, temperature=2.0), kd)
    torch.testing.assert_close(distillation_loss(student, teacher, target, alpha=0.0, temperature=2.0), ce)
    terms = distillation_loss_terms(student, teacher, None, alpha=1.0, temperature=2.0)
    torch.testing.assert_close(terms["loss"], kd)
    assert terms["task_loss"].item() == 0.0


def test_token_logits_equal_flattened_rows() -> None:
    student, teacher, target, mask = random_logits((3, 4, 7), seed=5)
    flat = distillation_loss_terms(
        student.reshape(12, 7), teacher.reshape(12, 7), target.reshape(12), mask=mask.reshape(12), temperature=2.0
    )
    nested = distillation_loss_terms(student, teacher, target, mask=mask, temperature=2.0)
    for name in flat:
        torch.testing.assert_close(flat[name], nested[name])


# ---------------------------------------------------------------------------------------------------------------------
# Masking, gradients, numerics
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_positions_do_not_count(divergence: Divergence) -> None:
    student, teacher, target, mask = random_logits((3, 4, 7), seed=6)
    target[~mask] = -100  # a masked position may carry any label, even an ignored one

    def run(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = s.clone().requires_grad_(True)
        loss = distillation_loss(s, t, target, alpha=0.6, temperature=2.0, divergence=divergence, mask=mask)
        loss.backward()
        assert s.grad is not None
        return loss.detach(), s.grad

    loss, grad = run(student, teacher)
    assert torch.all(grad[~mask] == 0)
    assert grad[mask].abs().sum() > 0
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~mask] = float("nan")
    noisy_teacher[~mask] = 1e4
    loss2, grad2 = run(noisy_student, noisy_teacher)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad, grad2)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_float64(divergence: Divergence) -> None:
    student, teacher, target, mask = random_logits((2, 3, 5), seed=7, scale=1.5, dtype=torch.float64)
    target[0, 0] = -100
    student.requires_grad_(True)
    teacher.requires_grad_(True)

    def kd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return kd_loss(s, t, temperature=2.0, divergence=divergence, mask=mask)

    def total(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return distillation_loss(s, t, target, alpha=0.3, temperature=1.5, divergence=divergence, mask=mask)

    assert kd(student, teacher).dtype == torch.float64
    assert torch.autograd.gradcheck(kd, (student, teacher))
    assert torch.autograd.gradcheck(total, (student, teacher))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_half_precision_large_logits_finite_and_non_negative(dtype: torch.dtype, divergence: Divergence) -> None:
    student, teacher, target, _ = random_logits((16, 50), seed=8, scale=500.0, dtype=dtype)
    student.requires_grad_(True)
    value = distillation_loss(student, teacher, target, alpha=1.0, temperature=1.0, divergence=divergence)
    assert value.dtype == torch.float32
    assert torch.isfinite(value) and value.item() >= 0.0
    value.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    # near-identical half-precision logits: rounding must not produce a negative divergence
    almost = (teacher.float() + 1e-3).to(dtype)
    assert kd_loss(almost, teacher, divergence=divergence).item() >= 0.0


def test_upcast_matches_float32_computation() -> None:
    student, teacher, _, _ = random_logits((8, 20), seed=9, dtype=torch.bfloat16)
    mixed = kd_loss(student, teacher.float(), temperature=2.0)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(kd_loss(student, teacher, temperature=2.0), mixed)
    torch.testing.assert_close(mixed, kd_loss(student.float(), teacher.float(), temperature=2.0))


@pytest.mark.parametrize("divergence", ["kl", "soft_ce", "js"])
def test_minus_inf_teacher_logits_give_no_nan(divergence: Divergence) -> None:
    student, teacher, _, _ = random_logits((4, 6), seed=10)
    teacher[:, 3] = -math.inf  # e.g. a masked vocabulary entry
    student.requires_grad_(True)
    value = kd_loss(student, teacher, temperature=2.0, divergence=divergence)
    value.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert value.item() == pytest.approx(ref_kd_loss(_np(student), _np(teacher), 2.0, divergence), rel=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_no_counted_position_gives_connected_zero(divergence: Divergence) -> None:
    student, teacher, target, _ = random_logits((3, 4, 7), seed=11)
    student.requires_grad_(True)
    none = torch.zeros(3, 4, dtype=torch.bool)
    cases = [
        distillation_loss_terms(student, teacher, target, divergence=divergence, mask=none)["loss"],
        distillation_loss_terms(student, teacher, torch.full_like(target, -100), divergence=divergence)["loss"],
        kd_loss(student, teacher, divergence=divergence, mask=none),
        cross_entropy(student, target, mask=none),
    ]
    for value in cases:
        assert value.item() == 0.0
        assert value.requires_grad
        (grad,) = torch.autograd.grad(value, student)
        assert torch.equal(grad, torch.zeros_like(grad))
    empty = torch.randn(0, 7, requires_grad=True)
    assert distillation_loss(empty, empty.detach(), torch.zeros(0, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "soft_ce", "js"])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 7.0])
def test_temperature_squared_scaling(divergence: Divergence, temperature: float) -> None:
    student, teacher, _, mask = random_logits((5, 9), seed=12, dtype=torch.float64)
    scaled = kd_loss(student, teacher, temperature=temperature, divergence=divergence, mask=mask)
    unscaled = kd_loss(student / temperature, teacher / temperature, temperature=1.0, divergence=divergence, mask=mask)
    torch.testing.assert_close(scaled, temperature**2 * unscaled)


def test_mse_ignores_temperature() -> None:
    student, teacher, _, mask = random_logits((5, 9), seed=13)
    at_one = kd_loss(student, teacher, divergence="mse", mask=mask)
    torch.testing.assert_close(kd_loss(student, teacher, temperature=9.0, divergence="mse", mask=mask), at_one)
    torch.testing.assert_close(at_one, F.mse_loss(student[mask], teacher[mask]))


# ---------------------------------------------------------------------------------------------------------------------
# External losses: MNN and Intel Neural Compressor
# ---------------------------------------------------------------------------------------------------------------------
def test_mnn_distill_loss_is_reverse_kl_alpha_09_t20() -> None:
    student, teacher, target, _ = random_logits((16, 10), seed=14, dtype=torch.float64)
    one_hot = np.eye(10)[target.numpy()]
    expected = mnn_distill_loss_reference(_np(student), _np(teacher), one_hot, temperature=20.0, alpha=0.9)
    ours = distillation_loss(student, teacher, target, alpha=0.9, temperature=20.0, divergence="reverse_kl")
    assert abs(ours.item() - expected) < 1e-6
    ours32 = distillation_loss(
        student.float(), teacher.float(), target, alpha=0.9, temperature=20.0, divergence="reverse_kl"
    )
    assert ours32.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("alpha", "temperature"), [(0.5, 1.0), (0.9, 4.0), (0.25, 10.0)])
def test_inc_ce_ce_is_soft_ce(alpha: float, temperature: float) -> None:
    student, teacher, target, _ = random_logits((16, 10), seed=15, dtype=torch.float64)
    expected = inc_kd_loss_reference(
        _np(student), _np(teacher), target.numpy(), temperature, loss_weights=(1 - alpha, alpha)
    )
    ours = distillation_loss(student, teacher, target, alpha=alpha, temperature=temperature, divergence="soft_ce")
    assert abs(ours.item() - expected) < 1e-6


def test_inc_kl_is_kl_divided_by_num_classes() -> None:
    student, teacher, target, _ = random_logits((16, 10), seed=16, dtype=torch.float64)
    alpha, temperature = 0.7, 3.0
    expected = inc_kd_loss_reference(
        _np(student), _np(teacher), target.numpy(), temperature, (1 - alpha, alpha), ("CE", "KL")
    )
    kd = kd_loss(student, teacher, temperature=temperature, divergence="kl")
    mapped = alpha * kd / 10 + (1 - alpha) * cross_entropy(student, target)
    assert abs(mapped.item() - expected) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Module twins
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_module_twins_equal_functions(divergence: Divergence) -> None:
    student, teacher, target, mask = random_logits((3, 4, 7), seed=17)
    kd_module = KDLoss(temperature=3.0, divergence=divergence)
    assert torch.equal(
        kd_module(student, teacher, mask), kd_loss(student, teacher, temperature=3.0, divergence=divergence, mask=mask)
    )
    module = DistillationLoss(alpha=0.8, temperature=3.0, divergence=divergence, ignore_index=1)
    expected = distillation_loss_terms(
        student, teacher, target, alpha=0.8, temperature=3.0, divergence=divergence, mask=mask, ignore_index=1
    )
    assert torch.equal(module(student, teacher, target, mask=mask), expected["loss"])
    for name, value in module.terms(student, teacher, target, mask=mask).items():
        assert torch.equal(value, expected[name])


def test_module_repr() -> None:
    assert repr(KDLoss(temperature=4, divergence="js")) == "KDLoss(temperature=4.0, divergence='js')"
    assert (
        repr(DistillationLoss(alpha=1, temperature=2.0))
        == "DistillationLoss(alpha=1.0, temperature=2.0, divergence='kl', ignore_index=-100)"
    )


def test_package_exports() -> None:
    import lightning_distill.losses as losses

    assert set(losses.__all__) == {
        "KDLoss",
        "DistillationLoss",
        "Divergence",
        "FeatureLoss",
        "FeatureLossName",
        "functional",
    }
    assert losses.functional is functional


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_alpha(alpha: object) -> None:
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\], got " + repr(alpha).replace("'", ".")):
        check_alpha(alpha)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`alpha`"):
        DistillationLoss(alpha=alpha)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [0, -1.0, float("inf"), float("nan"), "2"])
def test_bad_temperature(temperature: object) -> None:
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0, got " + repr(temperature)):
        check_temperature(temperature)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`temperature`"):
        KDLoss(temperature=temperature)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`temperature`"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=temperature)  # type: ignore[arg-type]


def test_bad_divergence() -> None:
    allowed = r"'kl', 'reverse_kl', 'soft_ce', 'js', 'mse', 'dkd' \('dkd' needs class targets\)"
    with pytest.raises(ValueError, match=f"`divergence` must be one of {allowed}, got 'kld'"):
        check_divergence("kld")
    with pytest.raises(ValueError, match="got 'KL'"):
        KDLoss(divergence="KL")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`divergence`"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, alpha=1.0, divergence="l2")  # type: ignore[arg-type]


def test_good_hyper_parameters_pass_through() -> None:
    assert check_alpha(0) == 0.0 and check_alpha(1) == 1.0
    assert check_temperature(np.float64(2.0)) == 2.0
    assert all(check_divergence(name) == name for name in DIVERGENCES)


def test_bad_ignore_index() -> None:
    with pytest.raises(ValueError, match=r"`ignore_index` must be an int, got -100\.0"):
        DistillationLoss(ignore_index=-100.0)  # type: ignore[arg-type]


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(
        ValueError, match=r"student logits \(8, 10\) and teacher logits \(8, 12\) .*class counts differ \(10 vs 12\)"
    ):
        kd_loss(torch.zeros(8, 10), torch.zeros(8, 12))
    with pytest.raises(ValueError, match=r"student logits \(8, 10\) and teacher logits \(4, 10\) .*leading"):
        distillation_loss(torch.zeros(8, 10), torch.zeros(4, 10), torch.zeros(8, dtype=torch.long))


def test_bad_target() -> None:
    logits = torch.zeros(8, 10)
    with pytest.raises(ValueError, match=r"`target` must have the logits' leading shape \(8,\).*got \(8, 1\)"):
        distillation_loss(logits, logits, torch.zeros(8, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"leading shape \(2, 4\)"):
        cross_entropy(torch.zeros(2, 4, 10), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integer tensor of class indices, got dtype torch.float32"):
        cross_entropy(logits, torch.zeros(8))
    with pytest.raises(ValueError, match=r"class index 10, outside \[0, 10\).*HINT.*ignore_index"):
        cross_entropy(logits, torch.full((8,), 10))
    with pytest.raises(ValueError, match="class index -1"):
        distillation_loss(logits, logits, torch.full((8,), -1))


def test_target_none_needs_alpha_one() -> None:
    logits = torch.zeros(8, 10)
    with pytest.raises(ValueError, match=r"`target` is None but `alpha` is 0\.5.*HINT: pass alpha=1\.0"):
        distillation_loss(logits, logits, None, alpha=0.5)
    with pytest.raises(ValueError, match=r"HINT: pass alpha=1\.0"):
        DistillationLoss(alpha=0.9)(logits, logits)


def test_bad_mask() -> None:
    logits = torch.zeros(2, 4, 10)
    with pytest.raises(ValueError, match=r"`mask` must be a bool tensor.*got dtype torch.int64.*HINT"):
        kd_loss(logits, logits, mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`mask` must have the logits' leading shape \(2, 4\).*got \(2, 4, 10\)"):
        kd_loss(logits, logits, mask=torch.ones(2, 4, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`mask`.*got list"):
        cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long), mask=[True])  # type: ignore[arg-type]


def test_bad_logits() -> None:
    with pytest.raises(ValueError, match=r"student logits must be a floating-point tensor.*torch.int64"):
        kd_loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"teacher logits must be a torch.Tensor, got ndarray"):
        kd_loss(torch.zeros(2, 3), np.zeros((2, 3)))  # type: ignore[arg-type]
