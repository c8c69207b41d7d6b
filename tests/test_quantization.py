"""Quantization-aware students: preparation, KD training, int8 export, observer freezing and exact resume."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_distill import DistillationCallback, DistillModule
from lightning_distill.models import MNIST1DTeacher
from lightning_distill.quantization import (
    FloatIsland,
    FreezeQuantization,
    QuantizedStudent,
    export_quantized,
    fusable_groups,
    model_bytes,
    observers_enabled,
    quantization_aware,
)
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
        (lambda: FreezeQuantization(observers_after=0), ValueError, r"`observers_after` must be None or an int >= 1"),
        (lambda: FreezeQuantization(batchnorm_after=-1), ValueError, r"`batchnorm_after` must be .*>= 0.*got -1"),
    ],
)
def test_bad_quantization_inputs_are_explained(call, error, match):
    with pytest.raises(error, match=match):
        call()
