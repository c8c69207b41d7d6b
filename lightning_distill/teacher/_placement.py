"""Placing the teacher's weights: refusing weights that were never materialized, converting a copy, not the model.

A precision conversion (the runner's own ``precision``, or the Trainer's ``*-true`` precision) that changes the
dtype of the caller's teacher would round its weights for good: the teacher the caller holds would be a bfloat16
model after the fit. So a conversion that changes any dtype is made on a copy, tensor by tensor, straight onto the
target device (no full-precision copy is ever made); the caller's teacher keeps its dtype and device. A move that
changes no dtype (the student's device, ``*-mixed`` precisions) is done in place, as Lightning moves the student.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

_UNKNOWN = object()  # a conversion that does more than cast floating weights (it replaces layers)


def refuse_meta(teacher: nn.Module) -> None:
    """Raise if any of the teacher's parameters or buffers is on the ``meta`` device (a shape without values).

    Example::

        >>> refuse_meta(nn.Linear(2, 2))
        >>> refuse_meta(nn.Linear(2, 2, device="meta"))
        Traceback (most recent call last):
        ...
        ValueError: The teacher's weights were never materialized: 2 of its 2 parameters and buffers ...
    """
    named = [*teacher.named_parameters(), *teacher.named_buffers()]
    on_meta = [name for name, tensor in named if tensor.is_meta]
    if on_meta:
        raise ValueError(
            f"The teacher's weights were never materialized: {len(on_meta)} of its {len(named)} parameters and "
            f"buffers are on the `meta` device ({on_meta[:5]}), e.g. because it was built under "
            "`torch.device('meta')` or accelerate's `init_empty_weights()`. A meta tensor has a shape but no values, "
            "so the teacher cannot run. HINT: load real weights: `TeacherRunner(teacher, checkpoint=path)`, or "
            "`teacher.to_empty(device='cpu')` followed by `teacher.load_state_dict(state)` (or build the teacher "
            "with its weights, e.g. `from_pretrained(...)`)."
        )


def cast(teacher: nn.Module, device: torch.device, dtype: torch.dtype | None, *, owned: bool) -> tuple[nn.Module, bool]:
    """The teacher on ``device`` with its floating tensors in ``dtype`` (``None``: kept), as ``Module.to`` does.

    Args:
        teacher: The teacher.
        device: Where its tensors go.
        dtype: What its floating tensors become; ``None`` keeps their dtypes.
        owned: Whether ``teacher`` is already a copy of the runner's own (then it is converted in place).

    Returns:
        The placed teacher, and whether it is a copy (the caller's teacher was left alone). ``teacher`` itself,
        moved in place, when no dtype changes or it is ``owned``.
    """
    if owned or dtype is None or not any(_becomes(t, dtype) != t.dtype for t in _tensors(teacher)):
        return teacher.to(device=device, dtype=dtype), False
    placed = _copy(teacher, device, dtype)
    return (teacher.to(device=device, dtype=dtype), False) if placed is None else (placed, True)


def convert(
    teacher: nn.Module, device: torch.device, conversion: Callable[[nn.Module], nn.Module], *, owned: bool
) -> tuple[nn.Module, bool]:
    """The teacher on ``device``, converted by ``conversion`` (a precision plugin's ``convert_module``).

    What ``conversion`` does is found on a small module on the ``meta`` device first: one that only casts floating
    weights (every ``*-true`` precision of Lightning) is done by :func:`cast`, so on a copy when a dtype changes; one
    that does more (it replaces layers, e.g. bitsandbytes) converts a full copy. Returns as :func:`cast` does.
    """
    dtype = _cast_dtype(conversion)
    if dtype is not _UNKNOWN:
        placed, copied = cast(teacher, device, dtype if isinstance(dtype, torch.dtype) else None, owned=owned)
        return conversion(placed), copied
    if owned:
        return conversion(teacher.to(device)), False
    duplicate = _copy(teacher, device, None)
    return (conversion(teacher.to(device)), False) if duplicate is None else (conversion(duplicate), True)


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _becomes(tensor: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``Module.to(dtype)`` gives ``tensor``: floating tensors take ``dtype``, others keep theirs."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _cast_dtype(conversion: Callable[[nn.Module], nn.Module]) -> object:
    """The dtype ``conversion`` gives floating weights, ``None`` if it keeps them, ``_UNKNOWN`` if it does more."""
    probe = nn.Linear(1, 1, device="meta")
    before = probe.weight.dtype
    try:
        result = conversion(probe)
    except Exception:  # e.g. a quantizing conversion that needs real weights
        return _UNKNOWN
    if type(result) is not nn.Linear or [name for name, _ in result.named_parameters()] != ["weight", "bias"]:
        return _UNKNOWN
    dtype = result.weight.dtype
    return None if dtype == before else dtype


def _copy(teacher: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module | None:
    """A deep copy of ``teacher`` on ``device`` with floating tensors in ``dtype``, built tensor by tensor.

    Each parameter and buffer is converted straight to its place, so the caller's full-precision weights are never
    copied; everything else (submodules, attributes, hooks) is deep-copied; shared (tied) weights stay shared.
    Returns ``None``, warning, if the teacher cannot be deep-copied: it is then converted in place.
    """
    memo: dict[int, object] = {}
    plain = all(type(p) is nn.Parameter for p in teacher.parameters()) and all(
        type(b) is Tensor for b in teacher.buffers()
    )
    if plain:  # parameter subclasses (quantized weights) are copied whole below, then converted
        for param in teacher.parameters():
            memo[id(param)] = nn.Parameter(_moved(param, device, dtype), requires_grad=False)
        for buffer in teacher.buffers():
            memo[id(buffer)] = _moved(buffer, device, dtype)
    try:
        copied = copy.deepcopy(teacher, memo)
    except Exception as err:
        rank_zero_warn(
            f"The teacher ({type(teacher).__name__}) cannot be deep-copied ({type(err).__name__}: {err}), so its "
            f"weights are converted in place{f' to {dtype}' if dtype else ''}: the model you passed is changed for "
            "good (the memory of a copy is saved). HINT: keep a copy of its original weights, "
            "`original = {k: v.clone() for k, v in teacher.state_dict().items()}`, or convert it yourself first."
        )
        return None
    return copied if plain else copied.to(device=device, dtype=dtype)


def _moved(tensor: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    return tensor.detach().to(device=device, dtype=_becomes(tensor, dtype), copy=True)
