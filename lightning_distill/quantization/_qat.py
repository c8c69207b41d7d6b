"""Quantization-aware students: fake-quantized training with KD, then a real int8 model for CPU.

The tooling is PyTorch's eager-mode quantization (``torch.ao.quantization``: ``fuse_modules_qat``, ``prepare_qat``,
``convert``), chosen because it is the path that works with the installed torch on CPU and gives real int8
convolution and linear kernels (x86 / fbgemm / qnnpack engines): the PT2E flow (``prepare_qat_pt2e``) has moved out of
torch into ``torchao``, whose QAT targets linear layers of language models and does not lower convolutions to int8
CPU kernels. Eager mode needs a float input and a float output: :func:`quantization_aware` wraps the model between a
quantize and a dequantize stub, so the student still takes and returns float tensors.

Eager mode swaps modules, not operations: a ``+`` between two quantized tensors (a residual connection) or a layer of a
class that is not exactly one torch swaps (a ``BatchNorm2d`` subclass that also applies an activation) trains with
fake quantization but has no int8 kernel. :func:`check_int8_inference` converts a copy of the student and runs it on
two samples, before any training, and raises :class:`Int8InferenceError` naming the layer and the operation.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic import qat as nniqat
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from typing_extensions import override

# Fused and swapped by exact type only: a subclass may do more in its forward (an activation after the norm, padding).
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Operations `torch.ao.nn.quantized.FloatFunctional` provides for quantized tensors.
_FUNCTIONAL_OPS = {"add", "add_", "mul", "mul_", "cat", "matmul"}
# Layers with no int8 kernel in eager mode: they run in float between a dequantize and a quantize stub.
_FLOAT_ONLY = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


class FloatIsland(nn.Module):
    """Runs ``layer`` in float inside a quantized network.

    Its input is dequantized, ``layer`` runs in float, and its output is quantized again with its own observed scale.
    Nothing inside ``layer`` is quantized (its ``qconfig`` is set to ``None``), so a block of convolutions and a
    residual ``+`` runs in float as a whole.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.dequant = tq.DeQuantStub()
        layer.qconfig = None  # type: ignore[assignment]  # prepare_qat leaves its layers float, convert too
        self.layer = layer
        self.quant = tq.QuantStub()

    def forward(self, x: Tensor) -> Tensor:
        """``quant(layer(dequant(x)))``."""
        return self.quant(self.layer(self.dequant(x)))


class QuantizedStudent(nn.Module):
    """A model between a quantize and a dequantize stub, prepared for quantization-aware training.

    Attributes:
        model: The (fused, fake-quantized) network; its layer names are the original ones, under ``model.``.
        bits: Bit width of weights and activations.
        per_channel: Whether weights have one scale per output channel.
        backend: The quantized engine the exported model runs on.
    """

    def __init__(self, model: nn.Module, bits: int, per_channel: bool, backend: str) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.model = model
        self.dequant = tq.DeQuantStub()
        self.bits, self.per_channel, self.backend = bits, per_channel, backend
        # Set by `quantization_aware` when it had no example input: the first training forward runs the trial.
        self._int8_trial_pending = False

    def forward(self, x: Tensor) -> Tensor:
        """Quantize the float input, run the network, return float outputs.

        The first forward in training mode of a student prepared without ``example_input`` first runs
        :func:`check_int8_inference` on the first two samples of ``x`` (so a fit refuses on its first step).

        Raises:
            Int8InferenceError: If the int8 model would fail at inference (first training forward only).
        """
        if self._int8_trial_pending and self.training:
            check_int8_inference(self, x)
            self._int8_trial_pending = False
        return self.dequant(self.model(self.quant(x)))


def qat_qconfig(bits: int = 8, per_channel: bool = True) -> tq.QConfig:
    r"""Fake-quantization settings for ``bits``-bit weights and activations.

    Activations: unsigned, asymmetric per tensor, :math:`[0, 2^b - 1]`. At 8 bits, as PyTorch's own x86 default,
    the observed range is mapped onto :math:`[0, 127]` (``reduce_range``: the x86 / fbgemm kernels accumulate 8-bit
    activations in 16 bits and can overflow with the full range) while values beyond it are clamped at 255, exactly
    as the exported int8 operators clamp, so the fake-quant model and the exported one agree on any input. (Below 8
    bits the exported operators still hold 8-bit values: an activation beyond the trained :math:`2^b - 1` range is
    clamped in training but not after export.) Weights: signed, symmetric, :math:`[-2^{b-1}, 2^{b-1} - 1]`, per
    output channel or per tensor. Moving-average min/max observers (the ``torch.ao`` QAT default).

    Example::

        >>> q = qat_qconfig(bits=4)
        >>> q.weight.p.keywords["quant_min"], q.weight.p.keywords["quant_max"]
        (-8, 7)
    """
    _check_bits(bits)
    if bits == 8:
        activation = _ReducedRangeFakeQuantize.with_args(
            observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, reduce_range=True
        )
    else:
        activation = tq.FakeQuantize.with_args(
            observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=2**bits - 1, dtype=torch.quint8
        )
    weight_observer = tq.MovingAveragePerChannelMinMaxObserver if per_channel else tq.MovingAverageMinMaxObserver
    weight = tq.FakeQuantize.with_args(
        observer=weight_observer,
        quant_min=-(2 ** (bits - 1)),
        quant_max=2 ** (bits - 1) - 1,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
    )
    return tq.QConfig(activation=activation, weight=weight)


class _ReducedRangeFakeQuantize(tq.FakeQuantize):
    """8-bit activation fake quant whose scale maps the observed range onto [0, 127] but which clamps at 255.

    ``torch.ao`` clamps the simulation at 127 under ``reduce_range`` while the exported quint8 operators clamp at 255,
    so the two disagree on every value beyond the observed range; clamping where the operators clamp removes that.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.observer_enabled[0] == 1:
            self.activation_post_process(x.detach())
            scale, zero_point = self.calculate_qparams()
            self.scale.resize_(scale.shape).copy_(scale)
            self.zero_point.resize_(zero_point.shape).copy_(zero_point)
        if self.fake_quant_enabled[0] == 1:
            x = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)
        return x


def fusable_groups(model: nn.Module) -> list[list[str]]:
    """The ``[conv, bn(, relu)]``, ``[conv, relu]`` and ``[linear, relu]`` runs of consecutive ``nn.Sequential`` items.

    Only ``nn.Sequential`` children are fused: their order is their execution order, which a custom ``forward``
    does not promise. Only these exact classes are fused: a subclass (a ``BatchNorm2d`` that also applies an
    activation, a ``Conv2d`` with its own padding) may do more in its ``forward`` than the fused module. Batch norm
    is folded into the convolution before it (``fuse_modules_qat`` keeps it trainable until
    :class:`FreezeQuantization` freezes its statistics).

    Example::

        >>> fusable_groups(nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten()))
        [['0', '1', '2']]
    """
    groups: list[list[str]] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        items = list(parent.named_children())
        index = 0
        while index < len(items):
            run = _run_at(items, index)
            if len(run) > 1:
                groups.append([f"{parent_name}.{name}" if parent_name else name for name in run])
            index += max(len(run), 1)
    return groups


def _run_at(items: list[tuple[str, nn.Module]], index: int) -> list[str]:
    first = items[index][1]
    kinds = [type(m) for _, m in items[index : index + 3]]
    if type(first) in _CONVS:
        if len(kinds) > 1 and kinds[1] in _NORMS:
            return [name for name, _ in items[index : index + (3 if len(kinds) > 2 and kinds[2] is nn.ReLU else 2)]]
        if len(kinds) > 1 and kinds[1] is nn.ReLU:
            return [items[index][0], items[index + 1][0]]
    if type(first) is nn.Linear and len(kinds) > 1 and kinds[1] is nn.ReLU:
        return [items[index][0], items[index + 1][0]]
    return [items[index][0]]


def quantization_aware(
    model: nn.Module,
    *,
    bits: int = 8,
    per_channel: bool = True,
    backend: str = "x86",
    fuse: Sequence[Sequence[str]] | None = None,
    float_layers: Sequence[str] = (),
    example_input: Tensor | None = None,
) -> QuantizedStudent:
    """Return a fake-quantized, trainable copy of ``model``; the original is left unchanged.

    The copy is in train mode with every parameter trainable, even when ``model`` is a teacher the callback froze.

    Conv/BN/ReLU runs are fused first (``fuse``, default: :func:`fusable_groups`, names relative to ``model``), then
    every convolution and linear layer gets fake-quantized weights and outputs (:func:`qat_qconfig`). Train it as the
    student of a :class:`~lightning_distill.DistillModule`; :func:`export_quantized` turns it into an int8 model.

    Before any training, a trial conversion (:func:`check_int8_inference`) proves that the int8 model runs: here on
    ``example_input`` when it is given, otherwise on the first two samples of the student's first forward in training
    mode (so a fit refuses on its first step, before any optimizer step). A model whose int8 forward would fail is
    refused with :class:`Int8InferenceError`, naming the layer and the operation, instead of training and then
    failing at inference.

    Args:
        model: A float network taking one float tensor. Element-wise additions of two tensors (residual connections)
            need ``torch.ao.nn.quantized.FloatFunctional`` in eager mode (``self.skip_add = FloatFunctional()``,
            ``out = self.skip_add.add(out, identity)``); layers of other classes than the ones torch swaps (e.g. a
            ``BatchNorm2d`` subclass that also applies an activation) need ``float_layers``.
        bits: Bit width of weights and activations, 2 to 8.
        per_channel: One weight scale per output channel (default) or one per tensor.
        backend: Quantized engine of the exported model: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``
            (must be one this torch was built with).
        fuse: Explicit groups of layer names to fuse, instead of the automatic ones.
        float_layers: Names of layers to run in float (:class:`FloatIsland`, nothing inside them is quantized), for
            operations without an int8 kernel; adaptive max pooling is always kept in float.
        example_input: A batch the model accepts (its first two samples are used): runs the trial conversion now
            instead of on the first training forward.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``example_input`` is not a tensor.
        ValueError: For ``bits`` outside 2..8, an engine this torch lacks, or a fuse group or float layer that names no
            layer (or a fuse group torch cannot fuse).
        Int8InferenceError: (a ``ValueError``) With ``example_input``, if the int8 model fails on it: the message
            names the layer, its class, the operation and the fix.

    Example::

        >>> student = quantization_aware(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), bits=8)
        >>> student(torch.randn(2, 4)).shape, type(student.model[0]).__name__
        (torch.Size([2, 3]), 'LinearReLU')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    _check_bits(bits)
    engines = torch.backends.quantized.supported_engines
    if backend not in engines or backend == "none":
        raise ValueError(f"`backend` {backend!r} is not a quantized engine of this torch; available: {engines}.")
    if not isinstance(per_channel, bool):
        raise TypeError(f"`per_channel` must be True or False, got {per_channel!r}.")
    if example_input is not None and not isinstance(example_input, Tensor):
        raise TypeError(
            f"`example_input` must be a tensor (a batch the model accepts), got {type(example_input).__name__}."
        )
    float_model = copy.deepcopy(model).train().requires_grad_(True)  # e.g. a copy of a teacher the callback froze
    groups = fusable_groups(float_model) if fuse is None else [list(group) for group in fuse]
    names = dict(float_model.named_modules())
    unknown = [name for group in groups for name in group if name not in names]
    if unknown:
        raise ValueError(f"`fuse` names layers that `model` does not have: {unknown}.")
    if groups:
        try:
            float_model = tq.fuse_modules_qat(float_model, groups)
        except AssertionError as err:  # torch: "did not find fuser method for: (<types>)"
            raise ValueError(
                f"`fuse` has a group torch cannot fuse ({err}). It fuses exact Conv/BatchNorm/ReLU/Linear classes only."
            ) from err
    names = dict(float_model.named_modules())
    missing = [name for name in float_layers if not name or name not in names]  # "" would be the whole model
    if missing:
        raise ValueError(f"`float_layers` names layers that `model` does not have: {missing}.")
    islands = [*float_layers, *(n for n, m in names.items() if isinstance(m, _FLOAT_ONLY) and n not in float_layers)]
    for name in islands:
        parent_name, _, child = name.rpartition(".")
        parent = float_model.get_submodule(parent_name) if parent_name else float_model
        setattr(parent, child, FloatIsland(names[name]))
    student = QuantizedStudent(float_model, bits, per_channel, backend)
    student.qconfig = qat_qconfig(bits, per_channel)  # type: ignore[assignment]
    tq.prepare_qat(student, inplace=True)
    if example_input is None:
        student._int8_trial_pending = True
    else:
        check_int8_inference(student, example_input)
    return student


def export_quantized(student: QuantizedStudent) -> nn.Module:
    """Convert a trained quantization-aware student into a real int8 model (a copy) that runs on CPU.

    Weights are stored as int8 with their scales; convolutions and linear layers run int8 kernels of the student's
    backend engine, which this function selects (``torch.backends.quantized.engine``).

    Raises:
        TypeError: If ``student`` was not made by :func:`quantization_aware`.
    """
    if not isinstance(student, QuantizedStudent):
        raise TypeError(
            f"`export_quantized` needs the model returned by `quantization_aware`, got {type(student).__name__}. "
            "HINT: for a DistillModule pass `module.student`."
        )
    torch.backends.quantized.engine = student.backend
    int8 = tq.convert(copy.deepcopy(student).cpu().eval(), inplace=False)
    if isinstance(int8, QuantizedStudent):
        int8._int8_trial_pending = False  # a converted model is what the trial checks, not a student
    return int8


class Int8InferenceError(ValueError):
    """The int8 model of a quantization-aware student fails at inference; raised before any training.

    Attributes:
        layer: The innermost layer whose forward was running when the operation failed, named as in the model given
            to :func:`quantization_aware` (``""``: that model's own ``forward``; ``None``: outside it).
        layer_type: Its class name.
        op: The failing operation as torch names it (``"aten::add.out"``), or ``None`` when the error names none.
    """

    def __init__(self, message: str, *, layer: str | None = None, layer_type: str = "", op: str | None = None) -> None:
        super().__init__(message)
        self.layer, self.layer_type, self.op = layer, layer_type, op


def check_int8_inference(student: QuantizedStudent, example_input: Tensor) -> None:
    """Prove that ``student`` converts to an int8 model that runs, on the first two samples of ``example_input``.

    A copy of the student (on CPU, float32, eval mode, without hooks other than torch's own) runs once in fake
    quantization, which sets the copy's activation scales from the sample, is converted with
    ``torch.ao.quantization.convert`` and runs in int8 with the student's engine selected
    (``torch.backends.quantized.engine`` is restored afterwards). The student itself (weights, observers, batch-norm
    statistics, mode) is not changed. :func:`quantization_aware` runs it before any training.

    Raises:
        TypeError: If ``student`` was not made by :func:`quantization_aware` or ``example_input`` is not a tensor.
        Int8InferenceError: If the conversion or the int8 forward fails. The message names the innermost layer whose
            forward was running, its class, the failing operation and the fix: ``FloatFunctional`` for a residual
            ``+``, ``float_layers=[...]`` to run the layer in float. The torch error is its ``__cause__``.

    Example::

        >>> class Residual(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...
        ...     def forward(self, x: Tensor) -> Tensor:
        ...         return self.fc(x) + x  # needs FloatFunctional in eager mode
        >>> try:
        ...     quantization_aware(nn.Sequential(Residual()), example_input=torch.randn(2, 4))
        ... except Int8InferenceError as err:
        ...     print(err.layer, err.layer_type, err.op)
        0 Residual aten::add.out
    """
    if not isinstance(student, QuantizedStudent):
        raise TypeError(f"`check_int8_inference` needs the model returned by `quantization_aware`, got {student!r}.")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"`example_input` must be a tensor, got {type(example_input).__name__}.")
    x = (example_input[:2] if example_input.dim() else example_input).detach().cpu()
    x = x.float() if x.is_floating_point() else x
    trial = copy.deepcopy(student).cpu().float().eval()
    trial._int8_trial_pending = False
    _drop_foreign_hooks(trial)  # e.g. feature-capture hooks must not record the trial's tensors
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = student.backend
        with torch.no_grad(), torch.autocast("cpu", enabled=False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"torch(\.|$)")  # deprecation notices, shown at prepare_qat
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
            trial(x)  # fake quantization: the copy's activation scales from the sample
            try:
                int8 = tq.convert(trial, inplace=True)
            except Exception as err:
                raise Int8InferenceError(f"torch cannot convert the student to int8: {_first_line(err)}") from err
            failure = _run_tracked(int8, x)
    finally:
        torch.backends.quantized.engine = engine
    if failure is not None:
        raise _int8_error(int8, *failure) from failure[0]


def _drop_foreign_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [key for key, hook in hooks.items() if not _is_torch_hook(hook)]:
                del hooks[key]


def _is_torch_hook(hook: object) -> bool:  # observers' hooks, weight_norm, ...: part of the forward
    return str(getattr(hook, "__module__", "")).startswith("torch.")


def _run_tracked(model: nn.Module, x: Tensor) -> tuple[Exception, nn.Module | None] | None:
    """Run ``model(x)``; on an exception return it with the innermost module whose forward was running."""
    running: list[nn.Module] = []

    def enter(module: nn.Module, args: Any) -> None:
        running.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        while running and running.pop() is not module:
            pass

    handles = (register_module_forward_pre_hook(enter), register_module_forward_hook(leave))
    try:
        model(x)
    except Exception as err:
        return err, (running[-1] if running else None)
    finally:
        for handle in handles:
            handle.remove()
    return None


def _int8_error(int8: QuantizedStudent, err: Exception, module: nn.Module | None) -> Int8InferenceError:
    name = _layer_names(int8.model).get(id(module)) if module is not None else None
    kind = type(module).__name__ if module is not None else type(int8).__name__
    found = re.search(r"\b(?:aten|quantized)::[\w.]+", str(err))
    op = found.group(0) if found else None
    if name:
        where = f"layer `{name}` ({kind})"
    elif name == "":
        where = f"the model's own forward ({kind})"
    elif module is None or any(module is wrapper for wrapper in (int8, int8.quant, int8.dequant)):
        where = f"the student's quantize/dequantize wrapper ({kind})"
    else:
        where = f"a `{kind}` that is not a registered layer of the model"
    fixes = []
    if op is not None and op.split("::")[1].split(".")[0] in _FUNCTIONAL_OPS:
        fixes.append(
            "write the residual addition with `torch.ao.nn.quantized.FloatFunctional`: `self.skip_add = "
            "FloatFunctional()` in `__init__` and `out = self.skip_add.add(out, identity)` instead of "
            "`out += identity` (also `.add_relu`, `.mul`, `.cat`)"
        )
    if name:
        fixes.append(f"run that layer in float with `float_layers=[{name!r}]` (a FloatIsland)")
    elif name == "":
        fixes.append("move the operation into a submodule and name it in `float_layers` to run it in float")
    swapped = (*_CONVS, *_NORMS, nn.Linear, nn.ReLU)
    base = next((cls for cls in swapped if isinstance(module, cls) and type(module) is not cls), None)
    subclass = (
        f" `{kind}` subclasses `{base.__name__}`, but eager mode quantizes and fuses exact classes only."
        if base is not None
        else ""
    )
    what = f"`{op}`" if op else "an operation"
    if "Quantized" in str(err):  # the dispatcher's "... from the 'QuantizedCPU' backend"
        what += " has no kernel for quantized tensors (eager mode swaps modules, not operations)"
    else:
        what += " failed"
    message = (
        f"The int8 model would fail at inference: in {where}, {what}.{subclass} "
        f"Fix: {'; or '.join(fixes) or 'run the failing part in float with `float_layers`'}. "
        f"Torch's error: {type(err).__name__}: {_first_line(err)}"
    )
    return Int8InferenceError(message, layer=name, layer_type=kind, op=op)


def _layer_names(model: nn.Module) -> dict[int, str]:
    """``id(module) -> name`` as in the model given to :func:`quantization_aware` (a FloatIsland is its layer)."""
    names: dict[int, str] = {}

    def visit(module: nn.Module, name: str) -> None:
        names.setdefault(id(module), name)
        for child_name, child in module.named_children():
            same = isinstance(module, FloatIsland) and child_name == "layer"
            visit(child, name if same else f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return names


def _first_line(err: BaseException) -> str:
    """The first sentence of ``err``'s message (torch's dispatcher errors go on listing every backend)."""
    lines = str(err).strip().splitlines()
    first = lines[0].split(". ")[0] if lines else ""
    return first if len(first) <= 300 else f"{first[:300]}..."


def model_bytes(model: nn.Module) -> int:
    """Bytes of the tensors in ``model``'s ``state_dict`` (its weights' size, without serialization overhead).

    Int8 weights count one byte per value plus their scales and zero points; float tensors their element size.

    Example::

        >>> model_bytes(nn.Linear(4, 2))  # 10 float32 values
        40
    """
    return sum(_tensor_bytes(value) for value in model.state_dict().values())


def _tensor_bytes(value: object) -> int:
    if isinstance(value, (tuple, list)):  # packed quantized parameters: (weight, bias)
        return sum(_tensor_bytes(item) for item in value)
    if not isinstance(value, Tensor):
        return 0
    total = value.numel() * value.element_size()
    if value.is_quantized and value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales, zero_points = value.q_per_channel_scales(), value.q_per_channel_zero_points()
        total += scales.numel() * scales.element_size() + zero_points.numel() * zero_points.element_size()
    elif value.is_quantized:
        total += 16  # one float64 scale and one int64 zero point
    return total


class FreezeQuantization(L.Callback):
    """Freeze a quantization-aware student's observers and batch-norm statistics after some epochs.

    Late in QAT the quantization ranges and the folded batch-norm statistics should stop moving so that the
    weights adapt to fixed grids. The flags are module buffers, so a checkpoint restores them on resume.

    Args:
        observers_after: Epochs (>= 1) after which observers stop updating scales and zero points (``None``: never).
        batchnorm_after: Epochs after which fused batch norms use their running statistics (``None``: never).

    Raises:
        ValueError: For a value that is not ``None`` or a non-negative int.
    """

    def __init__(self, observers_after: int | None = None, batchnorm_after: int | None = None) -> None:
        for name, value, least in (("observers_after", observers_after, 1), ("batchnorm_after", batchnorm_after, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                why = " (the observers must see at least one epoch to set the scales)" if least else ""
                raise ValueError(f"`{name}` must be None or an int >= {least} (epochs){why}, got {value!r}.")
        self.observers_after = observers_after
        self.batchnorm_after = batchnorm_after

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.observers_after is not None and epoch >= self.observers_after:
            pl_module.apply(tq.disable_observer)
        if self.batchnorm_after is not None and epoch >= self.batchnorm_after:
            pl_module.apply(nniqat.freeze_bn_stats)


def observers_enabled(module: nn.Module) -> list[bool]:
    """Whether each fake-quantize module of ``module`` still updates its observer (in module order)."""
    return [bool(m.observer_enabled[0]) for m in module.modules() if isinstance(m, tq.FakeQuantize)]


def _check_bits(bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"`bits` must be an int from 2 to 8 (eager-mode int8 kernels hold at most 8), got {bits!r}.")
