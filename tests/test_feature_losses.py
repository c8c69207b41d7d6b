"""Tests of the feature-matching losses against the independent references in tests/helpers/feature_reference.py."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lightning_distill.losses import FeatureLoss, FeatureLossName, functional
from lightning_distill.losses.functional import (
    attention_map,
    attention_transfer_loss,
    check_feature_loss,
    cosine_feature_loss,
    feature_loss,
    kl_feature_loss,
    l1_feature_loss,
    mse_feature_loss,
)
from tests.helpers.feature_reference import REFERENCES, ref_attention_map, ref_attention_transfer

PAIRWISE: tuple[FeatureLossName, ...] = ("mse", "l1", "cosine", "kl")
ALL_LOSSES: tuple[FeatureLossName, ...] = (*PAIRWISE, "attention")
FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": mse_feature_loss,
    "l1": l1_feature_loss,
    "cosine": cosine_feature_loss,
    "kl": kl_feature_loss,
    "attention": attention_transfer_loss,
}
PAIR_SHAPES = [(6, 5), (2, 3, 4, 5)]
MAP_SHAPES = [(2, 3, 7), (2, 3, 4, 5), (2, 2, 2, 3, 2)]
PROJECTOR = re.escape("FeatureMap(projector='auto')")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _pair(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return student, teacher


def _map_shape(name: str) -> tuple[int, ...]:
    return (2, 3, 4, 5) if name == "attention" else (3, 4, 5)


# ---------------------------------------------------------------------------------------------------------------------
# Values against the references
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", PAIR_SHAPES)
@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_losses_match_reference(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    student, teacher = _pair(shape, seed=len(shape), dtype=dtype)
    value = FUNCTIONS[name](student, teacher)
    assert value.dtype == dtype and value.shape == ()
    expected = REFERENCES[name](_np(student), _np(teacher))
    assert value.item() == pytest.approx(expected, rel=TOL[dtype], abs=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", MAP_SHAPES)
@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0])
def test_attention_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, p: float) -> None:
    student, teacher = _pair(shape, seed=5, dtype=dtype)
    np.testing.assert_allclose(_np(attention_map(student, p)), ref_attention_map(_np(student), p), rtol=TOL[dtype])
    value = attention_transfer_loss(student, teacher, p)
    assert value.dtype == dtype
    expected = ref_attention_transfer(_np(student), _np(teacher), p)
    assert value.item() == pytest.approx(expected, rel=TOL[dtype], abs=TOL[dtype])


def test_attention_with_different_channel_counts() -> None:
    student, _ = _pair((2, 3, 4, 4), seed=1)
    _, teacher = _pair((2, 8, 4, 4), seed=2)
    value = attention_transfer_loss(student, teacher)
    assert value.item() == pytest.approx(ref_attention_transfer(_np(student), _np(teacher)), rel=1e-5)
    assert feature_loss(student, teacher, "attention").item() == value.item()


def test_attention_map_hand_computed() -> None:
    # sample 0: |F| per channel = [3, 1] and [3, 1] -> mean [3, 1] -> / sqrt(10); sample 1: all zero -> zeros
    feature = torch.tensor([[[3.0, -1.0], [-3.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])  # (N=2, C=2, L=2)
    expected = torch.tensor([[3.0, 1.0], [0.0, 0.0]]) / torch.tensor([[math.sqrt(10.0)], [1.0]])
    torch.testing.assert_close(attention_map(feature, p=1.0), expected)
    # p=2: squares [[9, 1], [9, 1]] -> mean [9, 1] -> / sqrt(82)
    torch.testing.assert_close(attention_map(feature, p=2.0)[0], torch.tensor([9.0, 1.0]) / math.sqrt(82.0))


def test_attention_map_is_unit_norm_and_scale_invariant() -> None:
    student, _ = _pair((3, 4, 5, 6), seed=3)
    maps = attention_map(student)
    assert maps.shape == (3, 30)
    torch.testing.assert_close(maps.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(attention_map(student * 7.0), maps)


def test_non_contiguous_input() -> None:
    student, teacher = _pair((2, 5, 4, 3), seed=4)
    channels_last = student.contiguous(memory_format=torch.channels_last)
    assert attention_transfer_loss(channels_last, teacher).item() == pytest.approx(
        attention_transfer_loss(student, teacher).item(), rel=1e-6
    )
    transposed = student.transpose(-1, -2).contiguous().transpose(-1, -2)
    for name in PAIRWISE:
        assert FUNCTIONS[name](transposed, teacher).item() == pytest.approx(
            FUNCTIONS[name](student, teacher).item(), rel=1e-6
        )


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_identical_inputs_give_zero(name: str) -> None:
    student, _ = _pair(_map_shape(name), seed=6)
    value = FUNCTIONS[name](student, student.clone())
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert value.item() >= 0.0


def test_closed_forms() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[-1.0, 0.0], [0.0, 5.0]])
    assert cosine_feature_loss(s, t).item() == pytest.approx(1.0)  # opposite (2) and parallel (0)
    # KL(softmax(0, 1) || softmax(1, 0)) = (e - 1) / (e + 1) * 1 for a single row
    kl = kl_feature_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert kl.item() == pytest.approx(math.tanh(0.5), rel=1e-6)


def test_kl_minus_inf_teacher_gives_finite() -> None:
    student, teacher = _pair((4, 6), seed=7)
    teacher[:, 0] = -math.inf
    value = kl_feature_loss(student, teacher)
    assert math.isfinite(value.item()) and value.item() >= 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Precision, degenerate input, gradients
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_low_precision_inputs_give_finite_float32(name: str, low: torch.dtype) -> None:
    student, teacher = _pair(_map_shape(name), seed=8, dtype=low, scale=200.0)
    student.requires_grad_(True)
    value = FUNCTIONS[name](student, teacher)
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    expected = REFERENCES[name](_np(student), _np(teacher))
    assert value.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    value.backward()
    assert student.grad is not None and student.grad.dtype == low
    assert torch.isfinite(student.grad.float()).all()


def test_mixed_dtypes_promote_to_float64() -> None:
    student, teacher = _pair((3, 4), seed=9)
    for name in PAIRWISE:
        assert FUNCTIONS[name](student, teacher.double()).dtype == torch.float64
    s4, t4 = _pair((2, 3, 4, 4), seed=9)
    assert attention_transfer_loss(s4.double(), t4).dtype == torch.float64
    assert attention_transfer_loss(s4, t4.double()).dtype == torch.float64
    assert attention_transfer_loss(s4.bfloat16(), t4.half()).dtype == torch.float32


def test_cosine_zero_vectors_give_one_and_no_nan() -> None:
    student = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    value = cosine_feature_loss(student, teacher)
    assert value.item() == pytest.approx(3.0 / 4.0)  # three positions with a zero vector contribute 1, one gives 0
    assert value.item() == pytest.approx(REFERENCES["cosine"](_np(student), _np(teacher)))
    value.backward()
    assert student.grad is not None and teacher.grad is not None
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()
    # a position with a zero vector gets a zero gradient (not a ~1/eps spike)
    assert not student.grad[:3].any() and not teacher.grad[:3].any()
    all_zero = torch.zeros(2, 5, requires_grad=True)
    zero_value = cosine_feature_loss(all_zero, torch.zeros(2, 5))
    zero_value.backward()
    assert zero_value.item() == 1.0
    assert all_zero.grad is not None and not all_zero.grad.any()
    tiny = torch.full((1, 3), 1e-12, requires_grad=True)  # below eps but not zero: finite
    cosine_feature_loss(tiny, torch.ones(1, 3)).backward()
    assert tiny.grad is not None and torch.isfinite(tiny.grad).all()


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_attention_zero_activations_give_finite_gradients(p: float) -> None:
    student, teacher = _pair((2, 3, 4, 4), seed=10)
    student = student.relu()  # exact zeros, as after a ReLU
    student[1] = 0.0  # and one all-zero sample
    student.requires_grad_(True)
    value = attention_transfer_loss(student, teacher, p)
    value.backward()
    assert math.isfinite(value.item())
    assert student.grad is not None and torch.isfinite(student.grad).all()


EMPTY_SHAPES: dict[str, list[tuple[int, ...]]] = {
    "mse": [(0, 5), (3, 0), (0,)],
    "l1": [(0, 5), (3, 0)],
    "cosine": [(0, 5), (3, 0), (2, 0, 4)],
    "kl": [(0, 5), (3, 0), (2, 0, 4)],
    "attention": [(0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 0)],
}


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_empty_input_gives_attached_zero(name: str) -> None:
    for shape in EMPTY_SHAPES[name]:
        student = torch.randn(shape, requires_grad=True)
        teacher = torch.randn(shape, requires_grad=True)
        value = FUNCTIONS[name](student, teacher)
        assert value.item() == 0.0 and value.shape == () and value.requires_grad
        value.backward()
        for grad in (student.grad, teacher.grad):
            assert grad is not None and grad.shape == shape and not grad.any()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradients_flow_to_student_and_teacher(name: str) -> None:
    student, teacher = _pair(_map_shape(name), seed=11)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    FUNCTIONS[name](student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0
    detached_student = student.detach().clone().requires_grad_(True)
    value = FUNCTIONS[name](detached_student, teacher.detach())
    value.backward()
    assert detached_student.grad is not None and detached_student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradcheck_float64(name: str) -> None:
    shape = (2, 3, 3, 2) if name == "attention" else (3, 2, 4)
    student, teacher = _pair(shape, seed=12, dtype=torch.float64)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    assert torch.autograd.gradcheck(FUNCTIONS[name], (student, teacher))


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_gradcheck_attention_other_p_and_channels(p: float) -> None:
    student, _ = _pair((2, 2, 3, 3), seed=13, dtype=torch.float64)
    _, teacher = _pair((2, 4, 3, 3), seed=14, dtype=torch.float64)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, t: attention_transfer_loss(s, t, p), (student, teacher))


# ---------------------------------------------------------------------------------------------------------------------
# Dispatcher, module twin, exports
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_dispatcher_and_module_equal_functions(name: FeatureLossName) -> None:
    student, teacher = _pair(_map_shape(name), seed=15)
    expected = FUNCTIONS[name](student, teacher)
    assert torch.equal(feature_loss(student, teacher, name), expected)
    assert torch.equal(FeatureLoss(name)(student, teacher), expected)
    assert torch.equal(FeatureLoss(loss=name, p=3.0)(student, teacher), feature_loss(student, teacher, name, p=3.0))


def test_module_p_reaches_attention() -> None:
    student, teacher = _pair((2, 3, 4, 4), seed=16)
    assert torch.equal(FeatureLoss("attention", p=4)(student, teacher), attention_transfer_loss(student, teacher, 4.0))
    assert FeatureLoss("attention", p=4).p == 4.0


def test_default_loss_is_mse() -> None:
    student, teacher = _pair((3, 4), seed=17)
    assert torch.equal(feature_loss(student, teacher), mse_feature_loss(student, teacher))
    assert FeatureLoss().loss == "mse"


def test_module_repr() -> None:
    assert repr(FeatureLoss()) == "FeatureLoss(loss='mse')"
    assert repr(FeatureLoss("attention", p=1)) == "FeatureLoss(loss='attention', p=1.0)"


def test_package_exports() -> None:
    import lightning_distill.losses as losses

    assert {"FeatureLoss", "FeatureLossName"} <= set(losses.__all__)
    assert losses.__all__ == sorted(losses.__all__)
    names = {
        "FeatureLossName",
        "attention_map",
        "attention_transfer_loss",
        "check_feature_loss",
        "cosine_feature_loss",
        "feature_loss",
        "kl_feature_loss",
        "l1_feature_loss",
        "mse_feature_loss",
    }
    assert names <= set(functional.__all__)
    assert functional.__all__ == sorted(functional.__all__)
    for name in names:
        assert hasattr(functional, name)


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["MSE", "", "cos", None, 3])
def test_bad_loss_name(bad: object) -> None:
    pattern = rf"'mse', 'l1', 'cosine', 'kl', 'attention', got {bad!r}"
    with pytest.raises(ValueError, match=pattern):
        check_feature_loss(bad)  # type: ignore[arg-type]
    student, teacher = _pair((2, 3))
    with pytest.raises(ValueError, match=pattern):
        feature_loss(student, teacher, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=pattern):
        FeatureLoss(bad)  # type: ignore[arg-type]


def test_good_loss_names_pass_through() -> None:
    for name in ALL_LOSSES:
        assert check_feature_loss(name) == name


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, math.inf, "2", True, None])
def test_bad_p(bad: object) -> None:
    pattern = rf"`p` must be a finite number > 0, got {bad!r}"
    student, teacher = _pair((2, 3, 4, 4))
    with pytest.raises(ValueError, match=pattern):
        attention_map(student, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=pattern):
        attention_transfer_loss(student, teacher, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=pattern):
        feature_loss(student, teacher, "attention", p=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=pattern):
        FeatureLoss("mse", p=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_non_float_or_non_tensor_inputs(name: str) -> None:
    fn = FUNCTIONS[name]
    good = torch.randn(_map_shape(name))
    shape_text = re.escape(str(tuple(good.shape)))
    with pytest.raises(
        ValueError,
        match=rf"student features must be a floating-point tensor, got dtype torch.int64 and shape {shape_text}",
    ):
        fn(good.long(), good)
    with pytest.raises(ValueError, match=r"teacher features must be a floating-point tensor, got dtype torch.bool"):
        fn(good, good > 0)
    with pytest.raises(ValueError, match=r"student features must be a torch.Tensor, got ndarray"):
        fn(good.numpy(), good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"teacher features must be a torch.Tensor, got list"):
        fn(good, good.tolist())  # type: ignore[arg-type]


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_rank_and_shape_errors(name: str) -> None:
    fn = FUNCTIONS[name]
    with pytest.raises(
        ValueError, match=r"student features must have at least 1 dimension\(s\) \(\*, D\), got shape \(\)"
    ):
        fn(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(
        ValueError,
        match=r"\(4, 8\) and teacher features \(4, 16\).*widths \(last dim\) differ \(8 vs 16\).*" + PROJECTOR,
    ):
        fn(torch.randn(4, 8), torch.randn(4, 16))
    with pytest.raises(
        ValueError,
        match=r"\(2, 3, 5, 5\) and teacher features \(2, 6, 5, 5\).*dim 1 differs \(3 vs 6\).*" + PROJECTOR,
    ):
        fn(torch.randn(2, 3, 5, 5), torch.randn(2, 6, 5, 5))
    with pytest.raises(ValueError, match=r"\(4, 8\) and teacher features \(5, 8\).*dims \[0\] differ.*same batch"):
        fn(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"\(4, 8\) and teacher features \(2, 2, 8\).*ranks differ \(2 vs 3\)"):
        fn(torch.randn(4, 8), torch.randn(2, 2, 8))


def test_attention_rank_and_shape_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"student features must have at least 3 dimension\(s\) \(N, C, \*spatial\), got shape \(4, 8\)",
    ):
        attention_transfer_loss(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"feature map must have at least 3 dimension\(s\).*got shape \(4, 8\)"):
        attention_map(torch.randn(4, 8))
    with pytest.raises(
        ValueError,
        match=r"\(2, 3, 8, 8\) and teacher features \(2, 3, 4, 4\).*only the channel counts may differ.*pool or resize",
    ):
        attention_transfer_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\) and teacher features \(3, 3, 4, 4\).*batch size"):
        attention_transfer_loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\) and teacher features \(2, 3, 16\).*same rank"):
        attention_transfer_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"at least one channel \(dim 1\), got shape \(2, 0, 4, 4\)"):
        attention_transfer_loss(torch.randn(2, 0, 4, 4), torch.randn(2, 3, 4, 4))
