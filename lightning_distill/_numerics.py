"""The training loss's NaN/inf check: one device synchronisation a step, and a diagnosis naming the culprit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning_utilities import apply_to_collection
from torch import Tensor

from lightning_distill.teacher._runner import TeacherOutputs

_HINTS = {
    "inputs": "check the data and its preprocessing.",
    "student": "the student diverged or has bad weights: lower the learning rate, clip gradients, or train in "
    "bf16-mixed rather than 16-mixed.",
    "teacher": "check the teacher's checkpoint and precision (under 16-mixed, try bf16-mixed or 32-true).",
    "term": "a term overflowed (huge logits under divergence='mse', or a float16 loss): scale those logits or "
    "compute the loss in float32.",
}


def check_finite_loss(
    terms: Mapping[str, Tensor],
    where: str,
    student_logits: Tensor,
    teacher_outputs: TeacherOutputs | None,
    inputs: Any,
    owner: object,
) -> None:
    """Raise unless the step's ``loss`` is finite, naming what made it not: the inputs, a model, or a term.

    The check is one ``isfinite`` of a scalar (one device synchronisation a step); the diagnosis runs only when it
    fails. It names the earliest culprit in the data flow: the batch's inputs, then the student's logits, then the
    teacher's logits and features, then the loss terms whose own inputs were finite.

    Args:
        terms: The step's loss terms; ``terms["loss"]`` is checked.
        where: The step, for the message (e.g. ``"global step 12 (epoch 0, batch 12)"``).
        student_logits: The student's logits of the step.
        teacher_outputs: The teacher's outputs of the step, if any.
        inputs: The inputs the student received.
        owner: The object whose ``check_finite=False`` turns the check off (named in the message).

    Raises:
        FloatingPointError: If the loss is NaN or infinite.
    """
    loss = terms["loss"].detach()
    if bool(torch.isfinite(loss)):
        return
    culprit = "term"
    found = [f"{name} = {float(value.detach()):g}" for name, value in terms.items() if not _finite(value)]
    teacher: dict[str, Tensor] = {}
    if teacher_outputs is not None:
        teacher = {"logits": teacher_outputs.logits, **teacher_outputs.features}
    for side, value, label in (
        ("inputs", inputs, "the batch's inputs"),
        ("student", student_logits, "the student's logits"),
        ("teacher", teacher, "the teacher's"),
    ):
        described = _non_finite(value, minus_inf=side == "inputs")  # -inf logits are masked classes, not a fault
        if described:
            culprit, found = side, [f"{label} {text}" for text in described]
            break
    raise FloatingPointError(
        f"The training loss is {float(loss):g} at {where} ({'; '.join(found)}), so the step was not taken. HINT: "
        f"{_HINTS[culprit]} `{type(owner).__name__}(check_finite=False)` turns this check off."
    )


def _finite(value: Tensor) -> bool:
    return bool(torch.isfinite(value.detach()).all())


def _non_finite(value: Any, minus_inf: bool) -> list[str]:
    """A description of each floating tensor in ``value`` (a tensor or a collection) holding NaN or +inf (or -inf)."""
    found: list[str] = []

    def visit(tensor: Tensor, key: str = "") -> None:
        if not tensor.is_floating_point():
            return
        tensor = tensor.detach()
        nan, inf = int(tensor.isnan().sum()), int((tensor.isinf() if minus_inf else tensor.isposinf()).sum())
        if nan or inf:
            what = "inf" if minus_inf else "+inf"
            found.append(f"{key} ({nan} NaN and {inf} {what} of {tensor.numel()})".strip())

    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, Tensor):
                visit(item, str(key))
    else:
        apply_to_collection(value, Tensor, visit)
    return found
