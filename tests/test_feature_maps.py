"""FeatureMap validation, INC layer_mappings conversion, feature capture by name, projector choice and shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_distill import FeatureMap
from lightning_distill.features import ChannelProjector, FeatureCapture
from lightning_distill.features._capture import select_output
from lightning_distill.features._projectors import (
    build_projector,
    match_spatial,
    projector_from_dims,
    projector_from_state,
    resolve_projector,
)
from lightning_distill.schedules import LinearWarmup


# ---------------------------------------------------------------------------------------------------------------------
# FeatureMap
# ---------------------------------------------------------------------------------------------------------------------
def test_feature_map_defaults_and_keys():
    fmap = FeatureMap(student="blocks.1", teacher="layer4.0.conv2", teacher_select=0)
    assert (fmap.projector, fmap.loss, fmap.weight) == ("auto", "mse", 1.0)
    assert fmap.name == "blocks.1"
    assert fmap.student_key == "blocks.1"
    assert fmap.teacher_key == "layer4.0.conv2[0]"
    assert fmap.key == "blocks_1"
    assert FeatureMap(student="enc", teacher="t", student_select="hidden").student_key == "enc['hidden']"


def test_feature_map_config_round_trip_keeps_schedules():
    fmap = FeatureMap(student="a", teacher="b", loss="cosine", weight=LinearWarmup(2.0, warmup=3), name="x")
    config = fmap.to_config()
    assert config["weight"] == {"type": "linear_warmup", "unit": "epoch", "value": 2.0, "warmup": 3, "start": 0.0}
    assert FeatureMap(**config) == fmap


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(student="", teacher="t"), ValueError, "`student` must be a non-empty dotted layer name, got ''"),
        (dict(student="s", teacher=3), ValueError, "`teacher` must be a non-empty dotted layer name, got 3"),
        (dict(student="s", teacher="t", projector="conv"), ValueError, "`projector` must be one of .* got 'conv'"),
        (dict(student="s", teacher="t", loss="MSE"), ValueError, "got 'MSE'"),
        (dict(student="s", teacher="t", weight=-1.0), ValueError, "weight.*-1.0"),
        (dict(student="s", teacher="t", weight=LinearWarmup(-1.0, warmup=2)), ValueError, "weight.*-1.0"),
        (dict(student="s", teacher="t", student_dim=0), ValueError, "`student_dim` must be a positive int or None"),
        (dict(student="s", teacher="t", teacher_select=1.5), TypeError, "must be None, an int index .* got 1.5"),
        (dict(student="s", teacher="t", loss="attention", projector="linear"), ValueError, "needs no projector"),
    ],
)
def test_feature_map_rejects_bad_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        FeatureMap(**kwargs)


def test_inc_layer_mappings_convert_in_every_form():
    maps = FeatureMap.from_layer_mappings(
        [
            "same",
            ["layer1.0"],
            ["s.a", "t.a"],
            [["s.b", "1"], ["t.b", "hidden"]],
            [["s.c"], ["t.c", ""]],
            ["s.d", "", "t.d", "-1"],
        ],
        loss_types=["MSE", "KL", "L1", "cosine", "MSE", "attention"],
        loss_weights=[1, 2, 3, 4, 5, 6],
    )
    got = [(m.student_key, m.teacher_key, m.loss, m.weight) for m in maps]
    assert got == [
        ("same", "same", "mse", 1),
        ("layer1.0", "layer1.0", "kl", 2),
        ("s.a", "t.a", "l1", 3),
        ("s.b[1]", "t.b['hidden']", "cosine", 4),
        ("s.c", "t.c", "mse", 5),
        ("s.d", "t.d[-1]", "attention", 6),
    ]
    # INC's defaults: MSE, and equal weights summing to one
    assert [(m.loss, m.weight) for m in FeatureMap.from_layer_mappings(["a", "b"])] == [("mse", 0.5), ("mse", 0.5)]


@pytest.mark.parametrize(
    ("mappings", "kwargs", "error", "match"),
    [
        ([["a", "b", "c"]], {}, ValueError, "Cannot read the layer mapping"),
        ([["a", "b"]], {"loss_types": ["MSE", "MSE"]}, ValueError, r"one entry per layer mapping \(1\)"),
        ([[["a", lambda x: x], ["b"]]], {}, TypeError, "Callable output selectors are not supported"),
    ],
)
def test_inc_layer_mappings_errors(mappings, kwargs, error, match):
    with pytest.raises(error, match=match):
        FeatureMap.from_layer_mappings(mappings, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------------------------------
class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(4, 5), nn.Linear(5, 6)])})
        self.pair = PairOut()

    def forward(self, x):
        for block in self.encoder["blocks"]:
            x = block(x)
        return self.pair(x)[0]


class PairOut(nn.Module):
    def forward(self, x):
        return x + 1, {"hidden": x * 2}


def test_capture_nested_names_indices_and_selectors():
    net = Nested()
    capture = FeatureCapture(role="student")
    keys = [capture.add("encoder.blocks.1"), capture.add("pair", 0), capture.add("pair", 1)]
    assert keys == ["encoder.blocks.1", "pair[0]", "pair[1]"]
    capture.attach(net)
    x = torch.randn(3, 4)
    _ = net(x)  # outside `recording` the hooks do nothing (the bad selector below would raise)
    with pytest.raises(TypeError, match=r"'pair': part 1 of its output is a dict, not a tensor"):
        with capture.recording():
            net(x)
    capture.remove()

    capture = FeatureCapture(role="student")
    capture.add("encoder.blocks.1")
    capture.add("pair", 0)
    capture.attach(net)
    with capture.recording():
        out = net(x)
    got = capture.take()
    hidden = net.encoder["blocks"][1](net.encoder["blocks"][0](x))
    torch.testing.assert_close(got["encoder.blocks.1"], hidden)
    torch.testing.assert_close(got["pair[0]"], out)
    with pytest.raises(RuntimeError, match="did not run"):  # take() forgot what it handed over
        capture.take()
    capture.remove()
    assert not net.encoder["blocks"][1]._forward_hooks and not net.pair._forward_hooks


def test_capture_take_names_layers_that_did_not_run():
    capture = FeatureCapture(role="teacher")
    capture.add("1")
    capture.attach(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with capture.recording():
        pass
    with pytest.raises(RuntimeError, match=r"The teacher's layers \['1'\] did not run"):
        capture.take()


def test_unknown_layer_lists_the_closest_names():
    capture = FeatureCapture(role="student")
    capture.add("encoder.block.1")
    with pytest.raises(ValueError, match=r"has no layer named 'encoder.block.1'. Closest names: \['encoder.blocks.1'"):
        capture.attach(Nested())


def test_names_resolve_inside_strategy_wrappers():
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    capture = FeatureCapture(role="student")
    capture.add("encoder.blocks.0")
    capture.attach(Wrapper(net := Nested()))
    with capture.recording():
        net(torch.randn(2, 4))
    assert capture.take()["encoder.blocks.0"].shape == (2, 5)


@pytest.mark.parametrize(
    ("output", "select", "error", "match"),
    [
        (torch.ones(1), 0, TypeError, "returned a Tensor, which cannot be indexed by 0"),
        ((torch.ones(1),), 3, IndexError, "returned 1 values; index 3 is out of range"),
        ({"a": torch.ones(1)}, "b", KeyError, r"without key 'b'; its keys are \['a'\]"),
        ((torch.ones(1), "text"), 1, TypeError, "part 1 of its output is a str"),
    ],
)
def test_select_output_errors(output, select, error, match):
    with pytest.raises(error, match=match):
        select_output(output, select, "The layer 'x'")


# ---------------------------------------------------------------------------------------------------------------------
# Projectors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("student", "teacher", "kind"),
    [
        ((8, 16), (8, 16), "identity"),
        ((8, 16), (8, 32), "linear"),
        ((8, 12, 64), (8, 12, 128), "linear"),  # token features (B, L, D)
        ((8, 16, 10), (8, 32, 10), "conv1x1"),  # 1-D map, channels differ
        ((8, 16, 7, 7), (8, 64, 14, 14), "conv1x1"),  # channels and spatial size differ: pooled, then 1x1 conv
        ((8, 16, 7, 7), (8, 16, 14, 14), "identity"),  # spatial size only: pooled
    ],
)
def test_auto_projector_rule(student, teacher, kind):
    assert resolve_projector("auto", student, teacher, "map") == kind


@pytest.mark.parametrize(
    ("projector", "student", "teacher", "match"),
    [
        ("identity", (8, 16), (8, 32), "projector='identity' cannot match"),
        ("linear", (8, 16, 5), (8, 32, 6), "maps the last dimension only"),
        ("conv1x1", (8, 16), (8, 32), "needs channel-first maps"),
        ("auto", (8, 16), (4, 16), "same rank .* and batch size"),
        ("auto", (8, 16, 3), (8, 16), "same rank"),
    ],
)
def test_projector_kind_that_cannot_match_is_refused(projector, student, teacher, match):
    with pytest.raises(ValueError, match=match):
        resolve_projector(projector, student, teacher, "Feature map 'x'")


def test_projector_output_shapes():
    assert build_projector("linear", 16, 32)(torch.randn(4, 16)).shape == (4, 32)
    assert build_projector("linear", 16, 32)(torch.randn(4, 9, 16)).shape == (4, 9, 32)
    conv = build_projector("conv1x1", 8, 24)
    for spatial in [(10,), (5, 5), (2, 3, 4)]:
        assert conv(torch.randn(2, 8, *spatial)).shape == (2, 24, *spatial)


@pytest.mark.parametrize(
    ("conv_class", "shape", "channels_last"),
    [
        (nn.Conv1d, (3, 8, 7), False),
        (nn.Conv2d, (2, 8, 5, 6), False),
        (nn.Conv2d, (2, 8, 5, 6), True),
        (nn.Conv3d, (2, 8, 2, 3, 4), False),
        (nn.Conv2d, (0, 8, 5, 6), False),
    ],
)
def test_channel_projector_is_a_1x1_convolution(conv_class, shape, channels_last):
    # the same values and the same gradients (input, weight, bias) as the 1x1 convolution it stands for
    projector = ChannelProjector(8, 24)
    conv = conv_class(8, 24, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(projector.linear.weight.reshape(24, 8, *[1] * (len(shape) - 2)))
        conv.bias.copy_(projector.linear.bias)
    x = torch.randn(*shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grads = []
    for model in (projector, conv):
        leaf = x.clone().requires_grad_(True)
        out = model(leaf)
        assert out.shape == (shape[0], 24, *shape[2:])
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), leaf.grad, *(p.grad.reshape(-1) for p in model.parameters())))
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference)


def test_channel_projector_names_a_wrong_map():
    with pytest.raises(ValueError, match=r"expects a \(N, 8, \*spatial\) map, got \(2, 7, 5\)"):
        ChannelProjector(8, 24)(torch.randn(2, 7, 5))


def test_match_spatial_pools_to_the_smaller_size():
    s, t = torch.randn(2, 4, 8, 6), torch.randn(2, 9, 4, 12)
    ps, pt = match_spatial(s, t)
    assert ps.shape == (2, 4, 4, 6) and pt.shape == (2, 9, 4, 6)
    torch.testing.assert_close(ps, s.reshape(2, 4, 4, 2, 6).mean(3))  # pairs of rows averaged
    torch.testing.assert_close(pt, t.reshape(2, 9, 4, 6, 2).mean(4))
    same = torch.randn(2, 4, 3)
    assert match_spatial(same, same)[0] is same


def test_projectors_from_explicit_dims():
    assert isinstance(projector_from_dims("linear", "mse", 4, 8, "m"), nn.Linear)
    assert isinstance(projector_from_dims("conv1x1", "mse", 4, 8, "m"), ChannelProjector)
    assert isinstance(projector_from_dims("auto", "mse", 8, 8, "m"), nn.Identity)
    assert isinstance(projector_from_dims("auto", "attention", 4, 8, "m"), nn.Identity)
    assert projector_from_dims("auto", "mse", None, 8, "m") is None
    with pytest.raises(ValueError, match="cannot choose between 'linear' and 'conv1x1' from the widths alone"):
        projector_from_dims("auto", "mse", 4, 8, "m")
    with pytest.raises(ValueError, match="projector='identity' with different widths 4 and 8"):
        projector_from_dims("identity", "mse", 4, 8, "m")


def test_projectors_rebuild_from_saved_weights():
    for original in (nn.Linear(4, 8), ChannelProjector(3, 5), nn.Identity()):
        state = {f"projectors.m.{k}": v for k, v in original.state_dict().items()}
        rebuilt = projector_from_state(state, "projectors.m.")
        assert type(rebuilt) is type(original)
        rebuilt.load_state_dict({k.removeprefix("projectors.m."): v for k, v in state.items()})


def test_requests_after_the_hooks_are_attached_are_refused():
    capture = FeatureCapture(role="student")
    capture.add("0")
    capture.attach(net := nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert capture.add("0") == "0"  # already requested: fine
    with pytest.raises(RuntimeError, match="Request the student's features before its hooks are attached"):
        capture.add("1")
    with pytest.raises(RuntimeError, match="Request the student's features before its hooks are attached"):
        capture.add_input("1")
    capture.remove()
    assert not net[0]._forward_hooks
