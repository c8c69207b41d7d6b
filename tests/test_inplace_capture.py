"""Captured outputs that the forward changes in place later (``ReLU(inplace=True)``, ``out += identity``).

A capture is what the layer returned: :class:`FeatureCapture` notices a recorded tensor whose version counter moved
after its layer returned it, copies that layer from then on (and only that layer), and raises
:class:`ModifiedInPlaceError` instead of handing over a changed value; the teacher runner re-runs once, and
:class:`SelfDistillModule` learns it in its dry forward, so training, validation, early exit and export agree.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import SelfDistillModule
from lightning_distill.features import FeatureCapture, ModifiedInPlaceError
from lightning_distill.teacher import TeacherRunner
from tests.helpers.resnet import ResNet, image_batch
from tests.helpers.tiny import make_trainer

EXITS = ["bn1", "layer1.0.bn2"]  # both changed in place right after they return: relu_ and `out += identity`


def stem_bn(net: ResNet, x: Tensor) -> Tensor:
    """What ``bn1`` returns, computed by hand."""
    return net.bn1(net.conv1(x))


def block_bn2(net: ResNet, x: Tensor) -> Tensor:
    """What ``layer1.0.bn2`` returns, computed by hand."""
    block = net.layer1[0]
    stem = torch.relu(stem_bn(net, x))
    return block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(stem)))))


def resnet_capture(net: ResNet, *keys: str) -> FeatureCapture:
    capture = FeatureCapture(role="student")
    for key in keys:
        capture.add(key)
    capture.attach(net)
    return capture


def record(capture: FeatureCapture, net: nn.Module, x: Tensor) -> Tensor:
    with capture.recording():
        return net(x)


# ---------------------------------------------------------------------------------------------------------------------
# FeatureCapture
# ---------------------------------------------------------------------------------------------------------------------
def test_a_learned_copy_is_what_the_layer_returned_and_carries_its_gradients():
    torch.manual_seed(0)
    net = ResNet().eval()
    x, _ = image_batch(4)
    capture = resnet_capture(net, "bn1", "layer1")
    with torch.no_grad():  # the dry forward: its values only matter for their shapes
        record(capture, net, x)
    dry = capture.take(learn=True)
    assert tuple(dry["bn1"].shape) == (4, 8, 8, 8)
    assert capture.copied == {"bn1"}  # layer1 ends in an in-place relu, but nothing changes it after it returns

    seen: dict[str, Tensor] = {}
    for name in ("bn1", "layer1"):
        net.get_submodule(name).register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out))
    record(capture, net, x)
    features, returned = capture.take(), dict(seen)  # (computing by hand below runs the hooks again)
    expected = stem_bn(net, x)
    torch.testing.assert_close(features["bn1"], expected, rtol=0, atol=0)
    assert (returned["bn1"] < 0).sum() == 0 and (expected < 0).any()  # the layer's own output was relu'd in place
    assert features["bn1"].data_ptr() != returned["bn1"].data_ptr()  # copied
    assert features["layer1"] is returned["layer1"]  # not copied: the very tensor the layer returned

    # the copy is differentiable: the student's gradients are those of a loss on the independent value
    weight = torch.randn_like(expected)
    net.zero_grad()
    (features["bn1"] * weight).sum().backward()
    got = [p.grad.clone() for p in (net.conv1.weight, net.bn1.weight, net.bn1.bias)]
    net.zero_grad()
    (stem_bn(net, x) * weight).sum().backward()
    for grad, param in zip(got, (net.conv1.weight, net.bn1.weight, net.bn1.bias), strict=True):
        torch.testing.assert_close(grad, param.grad)


def test_an_unlearned_modified_capture_raises_naming_the_layer_then_copies_it():
    torch.manual_seed(0)
    net = ResNet().eval()
    x, _ = image_batch(4)
    capture = resnet_capture(net, "bn1", "layer1.0.bn2", "layer2")
    with torch.no_grad():
        record(capture, net, x)
        with pytest.raises(ModifiedInPlaceError, match=r"layers \['bn1', 'layer1.0.bn2'\]: .*modified in place") as err:
            capture.take()
    assert isinstance(err.value, RuntimeError) and "HINT:" in str(err.value)
    assert err.value.keys == ("bn1", "layer1.0.bn2") and err.value.layers == ("bn1", "layer1.0.bn2")
    assert err.value.role == "student"
    assert capture.copied == {"bn1", "layer1.0.bn2"}  # so a second forward is right
    with torch.no_grad():
        record(capture, net, x)
        features = capture.take()
        torch.testing.assert_close(features["bn1"], stem_bn(net, x), rtol=0, atol=0)
        torch.testing.assert_close(features["layer1.0.bn2"], block_bn2(net, x), rtol=0, atol=0)


def test_unmodified_captures_and_inference_mode_take_the_fast_path():
    torch.manual_seed(0)
    net = ResNet().eval()
    x, _ = image_batch(2)
    capture = resnet_capture(net, "layer1", "layer2", "fc")
    record(capture, net, x)
    assert set(capture.take()) == {"layer1", "layer2", "fc"} and capture.copied == frozenset()

    other = ResNet().eval()
    copying = resnet_capture(other, "bn1")
    copying.add_copies(["bn1"])
    with torch.inference_mode():  # no version counters there: nothing is detected, copies are still made
        record(capture, net, x)
        assert set(capture.take()) == {"layer1", "layer2", "fc"}
        record(copying, other, x)
        torch.testing.assert_close(copying.take()["bn1"], stem_bn(other, x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"has no keys \['bn2'\]"):
        copying.add_copies(["bn2"])


# ---------------------------------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------------------------------
def test_the_teacher_reruns_once_when_a_feature_is_modified_and_never_otherwise():
    torch.manual_seed(0)
    teacher = ResNet()
    runner = TeacherRunner(teacher)
    forwards = []
    teacher.register_forward_pre_hook(lambda _m, _a: forwards.append(1))
    x, _ = image_batch(4)

    runner.set_features([("layer1", None), ("layer2", None)])
    runner.run(x)
    runner.run(x)
    assert len(forwards) == 2 and runner._capture.copied == frozenset()  # one forward per run, nothing cloned

    runner.set_features([("bn1", None), ("layer1.0.bn2", None), ("layer1", None)])
    forwards.clear()
    first = runner.run(x)
    assert len(forwards) == 2  # found modified, re-run once with copies
    second = runner.run(x)
    assert len(forwards) == 3  # from then on: a single forward
    with torch.no_grad():
        for out in (first, second):
            torch.testing.assert_close(out.features["bn1"], stem_bn(teacher, x), rtol=0, atol=0)
            torch.testing.assert_close(out.features["layer1.0.bn2"], block_bn2(teacher, x), rtol=0, atol=0)
            torch.testing.assert_close(out.logits, teacher(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# SelfDistillModule
# ---------------------------------------------------------------------------------------------------------------------
def images(n: int = 32, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*image_batch(n, seed=seed)), batch_size=8)


def build(seed: int = 0, backbone: nn.Module | None = None) -> SelfDistillModule:
    torch.manual_seed(seed)
    return SelfDistillModule(
        ResNet() if backbone is None else backbone,
        exits=EXITS,
        num_classes=5,
        example_input=image_batch(2)[0],
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
    )


def exit_logits(model: SelfDistillModule, x: Tensor) -> dict[str, Tensor]:
    """Exit 0's logits from `exit_outputs`, early exit (threshold 0) and `export_exit(0)`; exit 1's from two."""
    model.eval()
    with torch.no_grad():
        logits, _, _ = model.exit_outputs(x)
    seen: list[Tensor] = []
    handle = model.exit_heads[0].register_forward_hook(lambda _m, _a, out: seen.append(out[1]))
    _, exit_index = model.predict_early_exit(x, threshold=0.0)
    handle.remove()
    assert exit_index.tolist() == [0] * len(x)
    with torch.no_grad():
        exported = [model.export_exit(i)(x) for i in range(2)]
    return {
        "outputs0": logits[0],
        "early0": seen[0],
        "export0": exported[0],
        "outputs1": logits[1],
        "export1": exported[1],
    }


def assert_agree(found: dict[str, Tensor]) -> None:
    for a, b in [("outputs0", "early0"), ("outputs0", "export0"), ("outputs1", "export1")]:
        torch.testing.assert_close(found[a], found[b], rtol=0, atol=1e-6, msg=lambda m, a=a, b=b: f"{a} vs {b}: {m}")


def test_training_validation_early_exit_and_export_see_the_same_exit_features(tmp_path):
    model = build()
    assert model._ensure_capture().copied == set(EXITS)  # learned in the dry forward that sized the heads
    make_trainer(tmp_path, max_epochs=2, limit_train_batches=None).fit(model, images(), images(16, seed=1))
    x, _ = image_batch(6, seed=2)
    assert_agree(exit_logits(model, x))

    # training reads what the exit layers returned as well
    model.train()
    logits, _, _ = model.exit_outputs(x)
    backbone = model.backbone
    torch.testing.assert_close(logits[0], model.exit_heads[0](stem_bn(backbone, x))[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[1], model.exit_heads[1](block_bn2(backbone, x))[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stored", [True, False], ids=["copies-stored", "older-checkpoint"])
def test_a_module_loaded_from_a_checkpoint_copies_the_same_exits(tmp_path, stored):
    model = build()
    trainer = make_trainer(tmp_path)
    trainer.fit(model, images(), images(8, seed=1))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["self_distill"]["copied"] == sorted(EXITS)
    if not stored:
        del checkpoint["self_distill"]["copied"]
        torch.save(checkpoint, path)
    loaded = SelfDistillModule.load_from_checkpoint(path, backbone=ResNet()).eval()
    x, _ = image_batch(6, seed=2)
    with torch.inference_mode():  # as in a Trainer's validation: without version counters
        logits, _, _ = loaded.exit_outputs(x.clone())  # an inference tensor, as a batch moved in validation
    assert loaded._ensure_capture().copied == set(EXITS)
    torch.testing.assert_close(logits[0], exit_logits(model, x)["outputs0"], rtol=0, atol=1e-6)
    assert_agree(exit_logits(loaded, x))


class TrainOnlyInPlace(ResNet):
    """Changes ``bn1``'s output in place only in training mode (the dry forward, in eval mode, cannot see it)."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.relu(x) if self.training else torch.relu(x)
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_an_exit_modified_only_in_training_is_refused_once_then_copied():
    torch.manual_seed(0)
    model = build(backbone=TrainOnlyInPlace())
    assert model._ensure_capture().copied == {"layer1.0.bn2"}
    x, _ = image_batch(4)
    model.train()
    with pytest.raises(ModifiedInPlaceError, match=r"layer 'bn1': .* modified in place.* only when training"):
        model.exit_outputs(x)
    logits, _, _ = model.exit_outputs(x)
    torch.testing.assert_close(logits[0], model.exit_heads[0](stem_bn(model.backbone, x))[1], rtol=0, atol=1e-6)
