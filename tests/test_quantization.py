"""Quantization-aware students: preparation, KD training, int8 export, observer freezing, exact resume, and the trial
conversion that refuses a model whose int8 forward would fail (residual adds, norm-activation blocks)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import DistillationCallback, DistillModule
from lightning_distill.demos import MNIST1DTeacher
from lightning_distill.quantization import (
    FloatIsland,
    FreezeQuantization,
    Int8InferenceError,
    QuantizedStudent,
    check_int8_inference,
    export_quantized,
    fusable_groups,
    model_bytes,
    observers_enabled,
    quantization_aware,
)
from lightning_distill.quantization import _qat as quantization_module
from tests.helpers.resnet import BasicBlock, ResNet, image_batch
from tests.helpers.tiny import make_trainer

torch.backends.quantized.engine = "x86"


def _signals(n: int = 64, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g)
    y = (x[:, :10].cumsum(-1)).argmax(-1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


def _bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 8, 5, stride=2, padding=2),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(80, 10),
    )


def _fit(tmp_path, student, epochs=2, callbacks=(), **kwargs):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    teacher = MNIST1DTeacher(channels=8)
    module = DistillModule(student=student, alpha=0.9, temperature=20.0, divergence="reverse_kl")
    trainer = make_trainer(
        tmp_path,
        max_epochs=epochs,
        limit_train_batches=None,
        limit_val_batches=0,
        callbacks=[DistillationCallback(teacher), *callbacks],
        **kwargs,
    )
    trainer.fit(module, _signals())
    return module, trainer


@pytest.mark.parametrize("model", [lambda: MNIST1DTeacher(channels=8), _bn_cnn], ids=["mnist1d-cnn", "conv-bn-relu"])
def test_a_student_trained_with_kd_exports_to_int8_close_to_its_fake_quant_outputs(tmp_path, model):
    torch.manual_seed(0)
    student = quantization_aware(model(), bits=8)
    _fit(tmp_path, student)
    x = next(iter(_signals(128, seed=1)))[0]
    student.eval()
    with torch.no_grad():
        fake = student(x)
        real = export_quantized(student)(x)
    step = float(export_quantized(student).model.get_submodule(_last_linear(student)).scale)
    assert (real - fake).abs().max().item() <= 3 * step  # within a few output quantization steps
    assert (real.argmax(-1) == fake.argmax(-1)).float().mean() >= 0.95
    assert model_bytes(export_quantized(student)) < 0.7 * model_bytes(model())  # int8 weights, float32 biases


def test_exported_int8_matches_fake_quant_beyond_the_observed_activation_range(tmp_path):
    torch.manual_seed(0)
    student = quantization_aware(MNIST1DTeacher(channels=8), bits=8)
    _fit(tmp_path, student, epochs=1)
    student.eval()
    x = 3 * next(iter(_signals(128, seed=1)))[0]  # three times the training inputs: past every observed maximum
    with torch.no_grad():
        fake, real = student(x), export_quantized(student)(x)
    quant = student.quant.activation_post_process  # the input's fake quant: values beyond its observed max
    observed_max = float(quant.activation_post_process.max_val)
    assert float(x.max()) > 1.5 * observed_max
    step = float(export_quantized(student).model.get_submodule(_last_linear(student)).scale)
    assert (real - fake).abs().max().item() <= 3 * step


def _last_linear(student: QuantizedStudent) -> str:
    return [n for n, m in student.model.named_modules() if isinstance(m, nn.Linear)][-1]


def test_conv_bn_relu_is_fused_and_adaptive_max_pool_runs_in_float():
    assert fusable_groups(_bn_cnn()) == [["1", "2", "3"], ["4", "5"]]
    student = quantization_aware(_bn_cnn())
    assert type(student.model[1]).__name__ == "ConvBnReLU1d" and isinstance(student.model[2], nn.Identity)
    cnn = quantization_aware(MNIST1DTeacher(channels=8))
    assert isinstance(cnn.model.pool, FloatIsland)
    original = MNIST1DTeacher(channels=8)
    quantization_aware(original)
    assert isinstance(original.pool, nn.AdaptiveMaxPool1d)  # the given model is left alone


@pytest.mark.parametrize(("bits", "per_channel"), [(4, True), (6, False), (2, True)])
def test_lower_bit_widths_use_their_ranges_and_export(bits, per_channel):
    torch.manual_seed(0)
    student = quantization_aware(MNIST1DTeacher(channels=8), bits=bits, per_channel=per_channel)
    x = torch.randn(32, 40)
    student(x)
    weight_fq = student.model.head.weight_fake_quant
    assert (weight_fq.quant_min, weight_fq.quant_max) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert weight_fq.qscheme == (torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric)
    int8 = export_quantized(student.eval())
    w = int8.model.head.weight().int_repr()
    assert int(w.min()) >= -(2 ** (bits - 1)) and int(w.max()) <= 2 ** (bits - 1) - 1
    assert torch.isfinite(int8(x)).all()


def test_observers_freeze_after_the_given_epoch(tmp_path):
    student = quantization_aware(MNIST1DTeacher(channels=8))
    assert observers_enabled(student) and all(observers_enabled(student))
    _fit(tmp_path, student, epochs=2, callbacks=[FreezeQuantization(observers_after=1, batchnorm_after=1)])
    assert not any(observers_enabled(student))


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run saves no checkpoints
def test_resume_restores_the_fake_quant_state_and_equals_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    base = MNIST1DTeacher(channels=8)
    full, _ = _fit(
        tmp_path / "full", quantization_aware(base), epochs=3, callbacks=[FreezeQuantization(observers_after=2)]
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(
        tmp_path / "a",
        quantization_aware(base),
        epochs=1,
        callbacks=[checkpoint, FreezeQuantization(observers_after=2)],
        enable_checkpointing=True,
    )
    resumed_student = quantization_aware(base)
    torch.manual_seed(0)
    module = DistillModule(student=resumed_student, alpha=0.9, temperature=20.0, divergence="reverse_kl")
    trainer = make_trainer(
        tmp_path / "b",
        max_epochs=3,
        limit_train_batches=None,
        limit_val_batches=0,
        callbacks=[DistillationCallback(MNIST1DTeacher(channels=8)), FreezeQuantization(observers_after=2)],
    )
    trainer.fit(module, _signals(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    expected, got = full.state_dict(), module.state_dict()
    assert set(expected) == set(got) and any("activation_post_process" in k or "fake_quant" in k for k in got)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: quantization_aware(nn.Linear(2, 2), bits=9), ValueError, r"`bits` must be an int from 2 to 8.*got 9"),
        (lambda: quantization_aware(nn.Linear(2, 2), bits=1), ValueError, "got 1"),
        (lambda: quantization_aware(nn.Linear(2, 2), backend="tpu"), ValueError, r"`backend` 'tpu' is not a quantized"),
        (lambda: quantization_aware(nn.Linear(2, 2), per_channel="yes"), TypeError, "`per_channel` must be True"),
        (lambda: quantization_aware("net"), TypeError, "`model` must be a torch.nn.Module, got str"),
        (lambda: quantization_aware(_bn_cnn(), fuse=[["1", "9"]]), ValueError, r"does not have: \['9'\]"),
        (lambda: quantization_aware(_bn_cnn(), float_layers=["pool"]), ValueError, r"does not have: \['pool'\]"),
        (lambda: export_quantized(nn.Linear(2, 2)), TypeError, "needs the model returned by `quantization_aware`"),
        (lambda: quantization_aware(_bn_cnn(), example_input=[1.0]), TypeError, "`example_input` must be a tensor"),
        (lambda: quantization_aware(_bn_cnn(), float_layers=[""]), ValueError, r"does not have: \[''\]"),
        (lambda: quantization_aware(_conv_bn_act(), fuse=[["0", "1"]]), ValueError, "group torch cannot fuse"),
        (lambda: check_int8_inference(nn.Linear(2, 2), torch.ones(1, 2)), TypeError, "needs the model returned by"),
        (lambda: FreezeQuantization(observers_after=0), ValueError, r"`observers_after` must be None or an int >= 1"),
        (lambda: FreezeQuantization(batchnorm_after=-1), ValueError, r"`batchnorm_after` must be .*>= 0.*got -1"),
    ],
)
def test_bad_quantization_inputs_are_explained(call, error, match):
    with pytest.raises(error, match=match):
        call()


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style ``BatchNormAct2d``: batch norm, then an activation, in one ``BatchNorm2d`` subclass."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))


class FloatFunctionalBlock(BasicBlock):
    """``BasicBlock`` with its residual addition written for eager-mode quantization."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, channels, stride)
        self.skip_add = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.skip_add.add(out, identity))


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNet(widths=(8, 16))


def _float_functional_resnet() -> nn.Module:
    net = _resnet()
    net.layer1[0] = FloatFunctionalBlock(8, 8)
    net.layer2[0] = FloatFunctionalBlock(8, 16, stride=2)
    return net


def _conv_bn_act() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def _images(n: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*image_batch(n, size=8, seed=seed)), batch_size=8, shuffle=False)


def _fit_images(tmp_path, student, steps=2):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    module = DistillModule(student=student, alpha=0.9, temperature=4.0)
    trainer = make_trainer(
        tmp_path, limit_train_batches=steps, limit_val_batches=0, callbacks=[DistillationCallback(_resnet())]
    )
    trainer.fit(module, _images())
    return module, trainer


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _assert_same_state(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_a_residual_add_is_refused_at_preparation_naming_the_block_and_the_op():
    x, _ = image_batch(4, size=8)
    with pytest.raises(Int8InferenceError, match=r"`layer1\.0` \(BasicBlock\), `aten::add") as caught:
        quantization_aware(_resnet(), example_input=x)
    error = caught.value
    assert isinstance(error, ValueError) and (error.layer, error.layer_type) == ("layer1.0", "BasicBlock")
    assert error.op is not None and error.op.startswith("aten::add")
    assert "FloatFunctional" in str(error) and "float_layers=['layer1.0']" in str(error)
    assert isinstance(error.__cause__, NotImplementedError)  # torch's own error, chained


@pytest.mark.parametrize(
    ("model", "match"),
    [(_resnet, r"`layer1\.0` \(BasicBlock\), `aten::add"), (_conv_bn_act, r"`1` \(BatchNormAct2d\)")],
    ids=["residual-add", "bn-act"],
)
def test_without_example_input_the_fit_is_refused_on_its_first_step_before_any_weight_changes(tmp_path, model, match):
    student = quantization_aware(model())  # no example input: nothing can be checked yet, preparation passes
    before = _state(student)
    with pytest.raises(Int8InferenceError, match=match):
        _fit_images(tmp_path, student)
    _assert_same_state(_state(student), before)  # no optimizer step, not even an observer update


def test_a_float_functional_residual_net_trains_and_exports_close_to_its_fake_quant_outputs(tmp_path):
    x, _ = image_batch(8, size=8)
    # The int8 adaptive average pool rounds its output onto its input's grid, which fake quantization does not
    # simulate (about 3 output steps on this net); in float, the rest of the net agrees within 2.
    student = quantization_aware(_float_functional_resnet(), example_input=x, float_layers=["avgpool"])
    before = _state(student)
    _fit_images(tmp_path, student)
    assert not torch.equal(student.model.fc.weight, before["model.fc.weight"])  # it trained
    student.eval()
    test_x = next(iter(_images(16, seed=1)))[0]
    int8 = export_quantized(student)
    with torch.no_grad():
        fake, real = student(test_x), int8(test_x)
    assert type(int8.model.layer1[0].skip_add).__name__ == "QFunctional"  # the residual add runs in int8
    step = float(int8.model.fc.scale)
    assert (real - fake).abs().max().item() <= 3 * step


def test_a_batchnorm_subclass_with_an_activation_is_not_fused_and_runs_in_float_when_named(tmp_path):
    assert fusable_groups(_conv_bn_act()) == []  # plain BN would be folded into the conv, losing the ReLU
    assert fusable_groups(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())) == [["0", "1", "2"]]
    x, _ = image_batch(4, size=8)
    with pytest.raises(Int8InferenceError, match=r"`1` \(BatchNormAct2d\), `aten::native_batch_norm`.*float_layers"):
        quantization_aware(_conv_bn_act(), example_input=x)
    student = quantization_aware(_conv_bn_act(), float_layers=["1"], example_input=x)
    assert isinstance(student.model[1], FloatIsland) and type(student.model[1].layer) is BatchNormAct2d
    _fit_images(tmp_path, student)
    student.eval()
    int8 = export_quantized(student)
    with torch.no_grad():
        fake, real = student(x), int8(x)
        island_output = int8.model[1].layer(int8.model[0](int8.quant(x)).dequantize())
    assert (island_output >= 0).all()  # the activation is kept
    assert (real - fake).abs().max().item() <= 3 * float(int8.model[3].scale)


def test_float_layers_around_a_residual_block_run_it_in_float_and_pass_the_trial():
    x, _ = image_batch(4, size=8)
    student = quantization_aware(_resnet(), float_layers=["layer1.0", "layer2.0"], example_input=x)
    assert not any(hasattr(m, "weight_fake_quant") for m in student.model.layer1.modules())  # nothing quantized inside
    with torch.no_grad():
        student(x)  # one observed forward, as training gives: export reads the observers' ranges
    assert torch.isfinite(export_quantized(student.eval())(x)).all()


def test_the_trial_conversion_leaves_the_student_unchanged(monkeypatch):
    student = quantization_aware(_float_functional_resnet())
    x, _ = image_batch(8, size=8)
    with torch.no_grad():
        student(x)  # a training forward: observers and batch-norm statistics hold values now
    captured: list[str] = []
    student.model.layer1.register_forward_hook(lambda *_: captured.append("layer1"))  # e.g. a feature-capture hook
    before, rng = _state(student), torch.get_rng_state()
    engines: list[str] = []
    real_convert = quantization_module.tq.convert
    monkeypatch.setattr(
        quantization_module.tq,
        "convert",
        lambda *a, **k: engines.append(torch.backends.quantized.engine) or real_convert(*a, **k),
    )
    torch.backends.quantized.engine = "qnnpack"
    try:
        check_int8_inference(student, x)
        assert engines == ["x86"] and torch.backends.quantized.engine == "qnnpack"  # the student's, then restored
    finally:
        torch.backends.quantized.engine = "x86"
    _assert_same_state(_state(student), before)
    assert torch.equal(torch.get_rng_state(), rng) and student.training and captured == []
    assert all(observers_enabled(student)) and type(student.model.fc).__module__.startswith("torch.ao.nn.qat")

    checked = quantization_aware(_float_functional_resnet(), example_input=x)  # its trial ran at preparation
    calls: list[int] = []
    real_check = quantization_module.check_int8_inference
    monkeypatch.setattr(
        quantization_module, "check_int8_inference", lambda s, batch: calls.append(len(batch)) or real_check(s, batch)
    )
    pending = quantization_aware(_float_functional_resnet())
    with torch.no_grad():
        pending.eval()(x), checked.eval()(x)  # eval forwards still observe: run both
    assert calls == []  # evaluation forwards do not run it
    pending.train(), checked.train()
    with torch.no_grad():
        outputs = pending(x), checked(x)
        pending(x), checked(x)
    assert calls == [8]  # once, on the first training forward (the check takes the first two samples itself)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    _assert_same_state(_state(pending), _state(checked))  # the trial changed nothing the forward then saw


def test_a_prepared_student_is_the_same_with_or_without_example_input():
    x, _ = image_batch(4, size=8)
    _assert_same_state(
        _state(quantization_aware(_float_functional_resnet(), example_input=x)),
        _state(quantization_aware(_float_functional_resnet())),
    )
