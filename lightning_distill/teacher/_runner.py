"""The frozen teacher: its outputs, how it is loaded, fingerprinted, frozen, placed and run.

:class:`TeacherRunner` is a plain object, not a Lightning hook: :class:`~lightning_distill.DistillationCallback`
drives it from the Trainer's hooks, and loop-level APIs can drive the same engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection, move_data_to_device
from torch import Tensor, nn

from lightning_distill._batches import call_with_inputs, extract_logits
from lightning_distill.features._capture import FeatureCapture, ModifiedInPlaceError, Selector
from lightning_distill.teacher import _placement
from lightning_distill.teacher._checkpoint import check_prefix, load_teacher_checkpoint
from lightning_distill.teacher._sharding import (
    StrategyKind,
    TeacherSharding,
    check_sharding_option,
    module_bytes,
    resolve_sharding,
    shard_teacher,
)

TeacherPrecision = Literal["32", "64", "16", "bf16"]
"""A precision of the teacher's own, independent of the student's: float32, float64, float16 or bfloat16 weights."""

_TEACHER_DTYPES: dict[str, torch.dtype] = {
    "32": torch.float32,
    "64": torch.float64,
    "16": torch.float16,
    "bf16": torch.bfloat16,
}


def _check_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"`device` must be a device such as 'cpu' or 'cuda:1', got {device!r}: {err}. HINT: "
            "`TeacherRunner(teacher, device='cpu')`, or leave it None to follow the student."
        ) from err


def _check_available(device: torch.device) -> None:
    """Raise if a requested teacher device does not exist on this machine (before any weight is moved)."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (device.index is not None and device.index >= count):
        raise RuntimeError(
            f"The teacher's `device={str(device)!r}` is not available: this machine has {count} CUDA device(s). "
            "HINT: pass 'cpu' or an existing 'cuda:<index>'."
        )


def _check_units(units: object) -> tuple[type[nn.Module], ...]:
    if (
        isinstance(units, (str, type))
        or not isinstance(units, Sequence)
        or not all(isinstance(u, type) and issubclass(u, nn.Module) for u in units)
    ):
        raise TypeError(
            f"`shard_units` must be a sequence of nn.Module classes, got {units!r}. HINT: pass the teacher's "
            "block class, e.g. `TeacherRunner(teacher, shard_units=[MyTransformerBlock])`."
        )
    return tuple(units)


def _first_tensor_device(inputs: Any) -> torch.device | None:
    found: list[torch.device] = []
    apply_to_collection(inputs, Tensor, lambda t: found.append(t.device))
    return found[0] if found else None


@dataclass(frozen=True)
class TeacherOutputs:
    """What the teacher produced for the current batch; computed without gradient and never modified.

    Attributes:
        logits: Teacher logits, classes in the last dimension: ``(B, C)`` or ``(B, L, V)``.
        features: Captured intermediate outputs keyed by layer name, ``"name[selector]"`` when only part of the
            layer's output was requested (empty unless features were requested).
        topk: Set when the outputs come from a top-k teacher cache: the KD term is then computed from it (see
            :func:`~lightning_distill.losses.functional.topk.topk_kd_loss`). From a classification
            :class:`~lightning_distill.TeacherCache` ``logits`` are the teacher's log-probabilities with the tail
            mass spread evenly (right for argmax and agreement); from a :class:`~lightning_distill.TokenCache` they
            are the stored tokens' top-k log-probabilities ``(N, k)`` (``(B, L, V)`` logits are what the cache
            avoids materializing): read ``topk``.

    Example::

        >>> out = TeacherOutputs(torch.zeros(4, 10))
        >>> out.logits.shape, dict(out.features), out.topk
        (torch.Size([4, 10]), {}, None)
    """

    logits: Tensor
    features: Mapping[str, Tensor] = field(default_factory=dict)
    topk: TopKTeacher | None = None


@dataclass(frozen=True)
class TopKTeacher:
    """A teacher distribution kept as its top-k log-probabilities at ``temperature`` and the remaining mass.

    Dense (a classification cache): one distribution per position of the logits, ``values`` and ``indices``
    ``(*, k)``, ``tail`` ``(*)``. Token rows (a :class:`~lightning_distill.TokenCache`): only the stored positions,
    ``values`` and ``indices`` ``(N, k)``, ``tail`` ``(N,)``, and ``positions`` ``(N, 2)`` says which (sample in the
    batch, position) each is; the loss takes the student's logits there.

    Attributes:
        values: Log-probabilities of the k most likely classes.
        indices: Their classes.
        tail: Probability mass of all other classes.
        temperature: The temperature the distribution was taken at.
        positions: Token rows only: ``(N, 2)`` int64 (batch row, position) of each stored distribution.
        num_classes: The teacher's vocabulary, when known (a student with another one is refused).
    """

    values: Tensor
    indices: Tensor
    tail: Tensor
    temperature: float
    positions: Tensor | None = None
    num_classes: int | None = None


class TeacherRunner:
    """Holds a frozen teacher in eval mode, places it, and runs it once per batch without gradient.

    Everything about *where and how* the teacher runs is given here, so that
    :class:`~lightning_distill.DistillationCallback` and :class:`~lightning_distill.Distiller` take one object:
    ``DistillationCallback(TeacherRunner(teacher, checkpoint="teacher.ckpt", precision="bf16"))``.

    Args:
        teacher: The teacher model (or a :class:`~lightning_distill.teacher.TeacherMixture`). Its parameters are
            frozen (``requires_grad_(False)``) and it is put in eval mode.
        checkpoint: Optional Lightning ``.ckpt`` or plain ``state_dict`` file loaded strictly into ``teacher`` here
            (one wrapping prefix such as ``"net."`` is stripped when that makes it match; see
            :func:`load_teacher_checkpoint`). A teacher built on the ``meta`` device receives the file's tensors.
        checkpoint_prefix: The key prefix of the teacher's weights in ``checkpoint`` (``"teacher."``, or nested:
            ``"model.teacher."``), stripped from the keys. Needed when several models in the file match the teacher
            (``student.*`` and ``teacher.*``, ``model.*`` and ``ema_model.*``): that is refused rather than guessed.
            ``""`` takes the teacher's keys without a prefix; ``None`` (default) finds the one prefix that matches.
        logits_layer: Optional dotted name of an inner layer whose output are the logits, for teachers that end in a
            softmax or return something else (the output of that layer is captured by a forward hook).
        precision: The teacher's own precision (``"32"``, ``"64"``, ``"16"``, ``"bf16"``), e.g. a ``"bf16"`` teacher
            for a float32 student: its weights and floating inputs are cast to it and it runs outside the Trainer's
            autocast. ``None`` follows the Trainer. A conversion that changes a dtype (this one, or the Trainer's
            ``*-true`` precision) is made on a copy, built tensor by tensor on the teacher's device: the model you
            pass keeps its weights, dtype and device, and :attr:`teacher` is the converted copy from :meth:`place`
            on. The copy costs its own size, and only while you keep a reference to the original (measured on the
            CPU for a 1.08 M-parameter MLP of 4,228 KiB in float32: a 2,114 KiB ``"bf16"`` copy, the process growing
            by 3.0 MiB; an 8,456 KiB ``"64"`` one). On another device (a CPU teacher, a GPU fit) the original is never
            moved there, so that device holds less than an in-place conversion, which moved the float32 weights
            first. To convert in place instead, convert the teacher yourself before (``teacher.to(torch.bfloat16)``):
            nothing is copied then.
        device: The teacher's own device (e.g. a big teacher kept on ``"cpu"`` or another GPU): inputs are moved to
            it and the outputs back to the inputs' device. ``None`` follows the student.
        sharding: Under ``FSDPStrategy`` / ``ModelParallelStrategy``: ``"shard"`` the teacher across all processes
            with FSDP2 (no optimizer, no gradients, each unit's weights gathered for its forward and freed after),
            ``"replicate"`` it (a full copy per process), or ``"auto"`` (default): shard when its weights take at
            least 1 GiB. Under other strategies ``"auto"`` replicates and ``"shard"`` is refused (see :meth:`shard`).
        shard_units: Module classes of the teacher to shard as separate FSDP units (e.g. its transformer block class),
            so its forward never holds more than one unit's full weights; by default the whole teacher is one unit.

    Raises:
        TypeError: If ``teacher`` is not an ``nn.Module`` or is wrapped in ``DataParallel`` /
            ``DistributedDataParallel``, ``checkpoint`` is not a path, or ``shard_units`` are not module classes.
        ValueError: If ``logits_layer`` names no layer of the teacher (the message lists the closest names), for an
            unknown ``precision``, ``device`` or ``sharding``, ``sharding="shard"`` together with a ``device``, a
            ``checkpoint_prefix`` without a ``checkpoint`` or that is not a non-empty string, or a checkpoint that is
            empty, truncated, ambiguous (several prefixes match) or does not match the teacher. At :meth:`place`,
            for a teacher whose weights are on the ``meta`` device; on the first :meth:`run`, for a teacher whose
            output are probabilities (rows non-negative summing to 1: it ends in a softmax), not logits.
        FileNotFoundError: For a ``checkpoint`` that does not exist.

    Example::

        >>> runner = TeacherRunner(nn.Linear(4, 3))
        >>> runner.run(torch.ones(2, 4)).logits.shape
        torch.Size([2, 3])
        >>> runner.teacher.training, runner.teacher.weight.requires_grad
        (False, False)
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        checkpoint: str | Path | None = None,
        checkpoint_prefix: str | None = None,
        logits_layer: str | None = None,
        precision: TeacherPrecision | None = None,
        device: str | torch.device | None = None,
        sharding: TeacherSharding = "auto",
        shard_units: Sequence[type[nn.Module]] = (),
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be a torch.nn.Module, got {type(teacher).__name__}.")
        if isinstance(teacher, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise TypeError(
                f"`teacher` is wrapped in {type(teacher).__name__}; the teacher must stay unwrapped (it is frozen and "
                "each process runs its own replica). HINT: pass `teacher.module`."
            )
        if precision is not None and precision not in _TEACHER_DTYPES:
            raise ValueError(
                f"`precision` must be one of {list(_TEACHER_DTYPES)} or None (follow the Trainer), got "
                f"{precision!r}. HINT: `TeacherRunner(teacher, precision='bf16')`."
            )
        if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
            raise TypeError(
                f"`checkpoint` must be a path (str or Path), got {type(checkpoint).__name__}. HINT: "
                "`TeacherRunner(teacher, checkpoint='teacher.ckpt')`."
            )
        if checkpoint_prefix is not None and checkpoint is None:
            raise ValueError(
                f"`checkpoint_prefix={checkpoint_prefix!r}` selects the teacher's keys in a checkpoint, but no "
                "`checkpoint` is given. HINT: `TeacherRunner(teacher, checkpoint='run.ckpt', "
                f"checkpoint_prefix={checkpoint_prefix!r})`, or drop `checkpoint_prefix`."
            )
        self.checkpoint_prefix = check_prefix(checkpoint_prefix)
        self.sharding = check_sharding_option(sharding)
        self.shard_units = _check_units(shard_units)
        if sharding == "shard" and device is not None:
            raise ValueError(
                f"`sharding='shard'` spreads the teacher over every process's device, so it cannot also stay on "
                f"`device={str(device)!r}`. HINT: drop one of the two options."
            )
        self.teacher = teacher
        self.logits_layer = logits_layer
        self.precision = precision
        self.dtype = None if precision is None else _TEACHER_DTYPES[precision]
        self.device = None if device is None else _check_device(device)
        self._capture = FeatureCapture(role="teacher")
        self._logits_key: str | None = None
        self._feature_keys: list[str] = []
        self._owns_teacher = False  # True once :attr:`teacher` is a converted copy of the model passed
        self._output_checked = False  # the first run checks the teacher's output (probabilities, not logits)
        self.set_features(())
        self.freeze()
        if checkpoint is not None:
            load_teacher_checkpoint(teacher, checkpoint, prefix=self.checkpoint_prefix)
            self.freeze()  # a teacher on the meta device was given new parameters
        self.checkpoint = None if checkpoint is None else str(checkpoint)

    def freeze(self) -> None:
        """Turn off gradients for every teacher parameter and put the teacher in eval mode."""
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def place(self, device: torch.device, convert: Callable[[nn.Module], nn.Module] | None = None) -> None:
        """Move the teacher to its own ``device`` (if set) or ``device``, and give it its precision.

        With a runner ``precision`` the weights are cast to it; otherwise ``convert`` (the Trainer's conversion for
        ``*-true`` precisions) is applied when given. A conversion that changes a dtype is made on a copy, which
        :attr:`teacher` is from then on (see ``precision``); the model passed keeps its weights.

        Raises:
            RuntimeError: If the runner's own ``device`` is a CUDA device this machine does not have.
            ValueError: If the teacher's weights are on the ``meta`` device (never materialized).
        """
        _placement.refuse_meta(self.teacher)
        if self.device is not None:
            _check_available(self.device)
        self.remove_hooks()  # a conversion may return a new module: hooks are attached again on the next run
        target = self.device if self.device is not None else device
        if self.dtype is not None:
            self.teacher, copied = _placement.cast(self.teacher, target, self.dtype, owned=self._owns_teacher)
        elif convert is not None:
            self.teacher, copied = _placement.convert(self.teacher, target, convert, owned=self._owns_teacher)
        else:
            self.teacher, copied = self.teacher.to(target), False
        self._owns_teacher = self._owns_teacher or copied
        self.freeze()

    def shard(self, kind: StrategyKind, strategy_name: str, device: torch.device) -> bool:
        """Shard the placed teacher across every process when :attr:`sharding`, the strategy and its size say so.

        A teacher on its own ``device`` is never sharded.

        Args:
            kind: The strategy's :func:`~lightning_distill.teacher._sharding.strategy_kind`.
            strategy_name: The strategy's class name, for the error message.
            device: This process's device.

        Returns:
            Whether the teacher is sharded now.

        Raises:
            ValueError: For ``sharding="shard"`` under a strategy that does not shard.
        """
        if self.device is not None or not resolve_sharding(
            self.sharding, kind, strategy_name, module_bytes(self.teacher)
        ):
            return False
        shard_teacher(self.teacher, device, self.shard_units)
        return True

    def set_features(self, layers: Iterable[tuple[str, Selector]]) -> list[str]:
        """Request the outputs of these ``(layer name, selector)`` pairs on every run; replaces earlier requests.

        Returns:
            The keys under which :attr:`TeacherOutputs.features` holds them.

        Raises:
            ValueError: If a layer does not exist (the message lists the closest names).
        """
        self.remove_hooks()
        self._capture = FeatureCapture(role="teacher")
        self._logits_key = None if self.logits_layer is None else self._capture.add(self.logits_layer)
        self._feature_keys = list(dict.fromkeys(self._capture.add(layer, select) for layer, select in layers))
        self._capture.check(self.teacher)
        return list(self._feature_keys)

    def attach_hooks(self) -> None:
        """Register the forward hooks that capture requested layer outputs (idempotent)."""
        self._capture.attach(self.teacher)

    def remove_hooks(self) -> None:
        """Remove every hook this runner registered on the teacher."""
        self._capture.remove()

    @torch.no_grad()
    def run(
        self, inputs: Any, context: contextlib.AbstractContextManager[Any] | None = None, features: bool = True
    ) -> TeacherOutputs:
        """Run the teacher on the inputs part of a batch and return its outputs.

        Args:
            inputs: A tensor, or a mapping passed as keyword arguments.
            context: The context to run under (the Trainer's precision context); none by default.
            features: Return the requested features (validation and test runs only need the logits).

        Raises:
            TypeError: If the output holds no logits (see :func:`~lightning_distill._batches.extract_logits`).
            ValueError: On the first run, if the teacher's weights are on the ``meta`` device, or its output are
                probabilities rather than logits (see ``logits_layer``).
        """
        if not self._output_checked:
            _placement.refuse_meta(self.teacher)
        self.attach_hooks()
        if self.teacher.training:
            self.teacher.eval()
        output_device = None
        if self.device is not None or self.dtype is not None:
            output_device = _first_tensor_device(inputs)
            inputs = self._to_teacher(inputs)
            if self.dtype is not None:
                context = None  # its own precision: the Trainer's autocast would override it
        output, captured = self._forward(inputs, context)
        if self._logits_key is not None:
            output = captured[self._logits_key]
        logits = extract_logits(output, role="teacher").detach()
        if not self._output_checked:
            _refuse_probabilities(logits, self.teacher, self.logits_layer)
            self._output_checked = True  # after the check: a refused teacher stays refused
        kept = {key: captured[key] for key in self._feature_keys} if features else {}
        if output_device is not None and logits.device != output_device:
            logits = logits.to(output_device)
            kept = {key: value.to(output_device) for key, value in kept.items()}
        return TeacherOutputs(logits=logits, features=kept)

    def _forward(
        self, inputs: Any, context: contextlib.AbstractContextManager[Any] | None
    ) -> tuple[Any, dict[str, Tensor]]:
        """Run the teacher with its hooks recording; return its output and the captured features.

        A captured output that a later operation changes in place (``ReLU(inplace=True)`` after a BatchNorm, a
        residual ``x += ...``) is found after the forward; its layer is then copied, and the forward runs again
        (once per capture: the teacher is in eval mode without gradient, so a second forward changes nothing).
        """
        with context if context is not None else contextlib.nullcontext():  # entered once: it may be single-use
            with self._capture.recording():
                output = call_with_inputs(self.teacher, inputs)
            try:
                return output, self._capture.take()
            except ModifiedInPlaceError:
                pass  # those layers are copied now
            with self._capture.recording():
                output = call_with_inputs(self.teacher, inputs)
            return output, self._capture.take()

    def _to_teacher(self, inputs: Any) -> Any:
        """Move the inputs to the teacher's device and cast floating tensors to its precision."""
        device = self.device if self.device is not None else next(self.teacher.parameters(), torch.empty(0)).device
        inputs = move_data_to_device(inputs, device)
        if self.dtype is None:
            return inputs
        return apply_to_collection(inputs, Tensor, lambda t: t.to(self.dtype) if t.is_floating_point() else t)


def _refuse_probabilities(logits: Tensor, teacher: nn.Module, logits_layer: str | None) -> None:
    """Raise if every row of ``logits`` is a probability distribution: non-negative, summing to 1 (a softmax output).

    Log-probabilities (``log_softmax``: non-positive rows whose exponentials sum to 1) are logits as good as any
    (softmax is invariant to a shift per row), so they pass. Rows of zeros (padding some models zero out) are left
    out; a single class has nothing to distill and is not judged.
    """
    if logits.ndim < 2 or logits.shape[-1] < 2 or not logits.is_floating_point() or logits.numel() == 0:
        return
    rows = logits.detach().reshape(-1, logits.shape[-1]).float()
    if not bool((rows >= 0).all()):
        return
    sums = rows.sum(-1)
    counted = sums != 0
    tolerance = max(1e-3, 4 * torch.finfo(logits.dtype).eps)  # a bfloat16 softmax sums to 1 within a few eps
    if not bool(counted.any()) or not bool(((sums[counted] - 1).abs() <= tolerance).all()):
        return
    where = "the teacher's output" if logits_layer is None else f"the output of its `logits_layer={logits_layer!r}`"
    seen, layer = _softmax_layer(teacher) if logits_layer is None else ("", None)
    raise ValueError(
        f"The teacher returns probabilities, not logits: on its first batch every row of {where}, shape "
        f"{tuple(logits.shape)}, is non-negative and sums to 1 (within {tolerance:.0e}){seen}. Distilling from them "
        "would train the student towards softmax(probabilities / T), a near-uniform target. HINT: pass "
        f"`TeacherRunner(teacher, logits_layer={layer or '<the layer before the softmax>'!r})`, or remove the "
        "final Softmax from the teacher (log-probabilities, `log_softmax`, are fine as logits)."
    )


def _softmax_layer(teacher: nn.Module) -> tuple[str, str | None]:
    """Name the teacher's last ``nn.Softmax`` layer, and the layer before it when they are in an ``nn.Sequential``."""
    for parent_name, parent in reversed(list(teacher.named_modules())):
        children = list(parent.named_children())
        for i in reversed(range(len(children))):
            name, child = children[i]
            if isinstance(child, nn.Softmax):
                full = f"{parent_name}.{name}" if parent_name else name
                if i == 0 or not isinstance(parent, nn.Sequential):
                    return f" (its layer {full!r} is an nn.Softmax)", None
                before = f"{parent_name}.{children[i - 1][0]}" if parent_name else children[i - 1][0]
                return f" (its layer {full!r} is an nn.Softmax, after {before!r})", before
    return "", None
