"""Tests for the demo models: shapes, named layers, parameter counts (closed-form), argument validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_distill.demos import MLPStudent, MNIST1DTeacher


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("batch", [1, 7])
def test_teacher_output_shape(batch: int) -> None:
    model = MNIST1DTeacher()
    assert model(torch.randn(batch, 40)).shape == (batch, 10)
    assert model(torch.randn(batch, 1, 40)).shape == (batch, 10)


def test_teacher_custom_sizes() -> None:
    model = MNIST1DTeacher(channels=8, num_classes=3, input_length=17)
    assert model(torch.randn(4, 17)).shape == (4, 3)


def test_teacher_layers_are_named_and_shaped() -> None:
    model = MNIST1DTeacher(channels=16)
    names = dict(model.named_modules())
    for name in ("features.conv1", "features.act1", "features.conv2", "features.act3", "pool", "head"):
        assert name in names
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        names[name].register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name in ("features.conv1", "features.conv2", "features.conv3", "pool")
    ]
    model(torch.randn(2, 40))
    for hook in hooks:
        hook.remove()
    assert shapes == {
        "features.conv1": (2, 16, 20),
        "features.conv2": (2, 16, 10),
        "features.conv3": (2, 16, 5),
        "pool": (2, 16, 1),
    }


@pytest.mark.parametrize("channels", [8, 32])
def test_teacher_parameter_count(channels: int) -> None:
    c = channels
    expected = (1 * c * 5 + c) + 2 * (c * c * 3 + c) + (c * 10 + 10)
    assert _num_params(MNIST1DTeacher(channels=channels)) == expected


@pytest.mark.parametrize("shape", [(4, 41), (4, 2, 40), (40,), (2, 1, 1, 40)])
def test_teacher_rejects_bad_input_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expects inputs of shape \(B, 40\).*got " + re_shape(shape)):
        MNIST1DTeacher()(torch.randn(*shape))


def re_shape(shape: tuple[int, ...]) -> str:
    return str(shape).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize(("depth", "hidden"), [(1, 5), (2, 256), (3, 100)])
def test_student_shape_and_parameter_count(depth: int, hidden: int) -> None:
    model = MLPStudent(hidden=hidden, depth=depth)
    assert model(torch.randn(3, 40)).shape == (3, 10)
    expected = (40 * hidden + hidden) + (depth - 1) * (hidden * hidden + hidden) + (hidden * 10 + 10)
    assert _num_params(model) == expected
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    assert len(linears) == depth + 1


def test_student_layers_are_named() -> None:
    names = dict(MLPStudent().named_modules())
    for name in ("net.fc1", "net.act1", "net.fc2", "net.act2", "net.out"):
        assert name in names
    assert names["net.out"].out_features == 10  # type: ignore[operator, comparison-overlap]


def test_student_flattens_extra_dimensions() -> None:
    assert MLPStudent(input_dim=40)(torch.randn(5, 1, 40)).shape == (5, 10)


def test_default_student_is_bigger_than_teacher_but_both_are_small() -> None:
    teacher, student = _num_params(MNIST1DTeacher()), _num_params(MLPStudent())
    assert 5_000 < teacher < 10_000
    assert 50_000 < student < 100_000


@pytest.mark.parametrize("model_cls", [MNIST1DTeacher, MLPStudent])
def test_models_can_fit_a_small_batch(model_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = model_cls()
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(50):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (MNIST1DTeacher, {"channels": 0}, r"`channels` must be a positive integer, got 0"),
        (MNIST1DTeacher, {"num_classes": -1}, r"`num_classes` must be a positive integer, got -1"),
        (MNIST1DTeacher, {"input_length": 40.0}, r"`input_length` must be a positive integer, got 40\.0"),
        (MNIST1DTeacher, {"channels": True}, r"`channels` must be a positive integer, got True"),
        (MLPStudent, {"input_dim": 0}, r"`input_dim` must be a positive integer, got 0"),
        (MLPStudent, {"hidden": "256"}, r"`hidden` must be a positive integer, got '256'"),
        (MLPStudent, {"num_classes": 0}, r"`num_classes` .* got 0"),
        (MLPStudent, {"depth": 0}, r"`depth` must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_raise(cls: type[nn.Module], kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
