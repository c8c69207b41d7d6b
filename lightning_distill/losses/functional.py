r"""Knowledge-distillation losses as pure tensor functions.

Conventions shared by every function here:

- The class dimension is the **last** one; every leading dimension is a position, so ``(B, C)`` image logits and
  ``(B, L, V)`` token logits go through the same code.
- ``mask`` is a bool tensor over the leading dimensions; ``True`` marks the positions that count. Positions whose
  ``target`` equals ``ignore_index`` are removed from **both** terms of :func:`distillation_loss`.
- Logits are upcast to float32 (float64 stays float64) before any softmax, and every divergence is computed from
  log-probabilities (``log_softmax``, ``F.kl_div(..., log_target=True)``, a log-space mixture for ``"js"``), so
  bf16/fp16 logits and zero probabilities give neither NaN nor a negative divergence. ``-inf`` logits (a masked
  vocabulary entry) count as probability zero.
- Reduction: sum over classes, mean over counted positions (``"batchmean"``). With no counted position the result
  is a zero that is still attached to the autograd graph, so ``backward()`` gives zero gradients, not NaN.
- Gradients flow into both logits tensors; pass a detached teacher (the callback does).

The weight ``alpha`` multiplies the **distillation** term, as in MNN's ``_DistillLoss``, Intel Neural Compressor's
``KnowledgeDistillationLoss`` (``loss_weights=[1 - alpha, alpha]``) and NVIDIA ModelOpt. torchdistill's
``KDLoss`` uses the opposite convention (its ``alpha`` weights the hard-label term), so torchdistill's ``alpha=a``
is ``alpha=1 - a`` here.
"""

from __future__ import annotations

import math
from typing import Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Divergence",
    "check_alpha",
    "check_divergence",
    "check_temperature",
    "cross_entropy",
    "distillation_loss",
    "distillation_loss_terms",
    "kd_loss",
]

Divergence = Literal["kl", "reverse_kl", "soft_ce", "js", "mse"]
"""How the student's distribution is compared with the teacher's (see :func:`kd_loss`)."""

_DIVERGENCES: tuple[str, ...] = get_args(Divergence)
_LOG_TWO = math.log(2.0)


# --------------------------------------------------------------------------------------------------------------------
# Hyper-parameter validation (shared with the module twins and DistillModule)
# --------------------------------------------------------------------------------------------------------------------
def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_alpha(alpha: float) -> float:
    """Validate the weight of the distillation term and return it as a float.

    Args:
        alpha: Weight of the KD term; the task (cross-entropy) term gets ``1 - alpha``.

    Raises:
        ValueError: If ``alpha`` is not a number in ``[0, 1]``.

    Example::

        >>> check_alpha(0.9)
        0.9
    """
    if not _is_real_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"`alpha` must be in [0, 1], got {alpha!r}. It weights the distillation term: 1.0 is pure distillation, "
            "0.0 plain supervised training."
        )
    return float(alpha)


def check_temperature(temperature: float) -> float:
    """Validate a softmax temperature and return it as a float.

    Args:
        temperature: Softmax temperature; must be finite and strictly positive.

    Raises:
        ValueError: If ``temperature`` is not a finite number greater than zero.

    Example::

        >>> check_temperature(4)
        4.0
    """
    if not _is_real_number(temperature) or not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(
            f"`temperature` must be a finite number > 0, got {temperature!r}. HINT: 1.0 leaves the logits unchanged; "
            "Hinton et al. use values between 1 and 20."
        )
    return float(temperature)


def check_divergence(divergence: str) -> Divergence:
    """Validate the name of a divergence and return it.

    Args:
        divergence: One of ``"kl"``, ``"reverse_kl"``, ``"soft_ce"``, ``"js"``, ``"mse"``.

    Raises:
        ValueError: If ``divergence`` is not one of the allowed names; the message lists them.

    Example::

        >>> check_divergence("js")
        'js'
    """
    if not isinstance(divergence, str) or divergence not in _DIVERGENCES:
        allowed = ", ".join(repr(name) for name in _DIVERGENCES)
        raise ValueError(f"`divergence` must be one of {allowed}, got {divergence!r}.")
    return cast(Divergence, divergence)


def _check_ignore_index(ignore_index: int) -> int:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"`ignore_index` must be an int, got {ignore_index!r}.")
    return ignore_index


# --------------------------------------------------------------------------------------------------------------------
# Tensor validation
# --------------------------------------------------------------------------------------------------------------------
def _check_logits(name: str, logits: object) -> Tensor:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}.")
    if logits.ndim < 1 or not logits.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor with the classes in the last dimension, got dtype "
            f"{logits.dtype} and shape {tuple(logits.shape)}."
        )
    return logits


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    _check_logits("student logits", student_logits)
    _check_logits("teacher logits", teacher_logits)
    if student_logits.shape == teacher_logits.shape:
        return
    s_shape, t_shape = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if s_shape[-1] != t_shape[-1]:
        why = (
            f"class counts differ ({s_shape[-1]} vs {t_shape[-1]}). HINT: the teacher and the student must score the "
            "same label set in the same order; slice or project the teacher's logits first."
        )
    else:
        why = "the leading (position) dimensions differ. HINT: both models must see the same batch."
    raise ValueError(f"student logits {s_shape} and teacher logits {t_shape} must have the same shape, but {why}")


def _check_mask(mask: Tensor | None, lead_shape: tuple[int, ...]) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"`mask` must be a bool tensor (True = position counts), got {got}. HINT: pass `mask.bool()` or "
            "`attention_mask == 1`."
        )
    if tuple(mask.shape) != lead_shape:
        raise ValueError(
            f"`mask` must have the logits' leading shape {lead_shape} (no class dimension), got {tuple(mask.shape)}."
        )


def _check_target(target: Tensor, lead_shape: tuple[int, ...]) -> None:
    if (
        not isinstance(target, Tensor)
        or target.is_floating_point()
        or target.is_complex()
        or target.dtype == torch.bool
    ):
        got = f"dtype {target.dtype}" if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"`target` must be an integer tensor of class indices, got {got}.")
    if tuple(target.shape) != lead_shape:
        raise ValueError(
            f"`target` must have the logits' leading shape {lead_shape} (one class index per position), got "
            f"{tuple(target.shape)}."
        )


def _check_target_range(target_rows: Tensor, num_classes: int, ignore_index: int) -> None:
    if target_rows.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(target_rows))
    if low < 0 or high >= num_classes:
        value = low if low < 0 else high
        raise ValueError(
            f"`target` holds class index {value}, outside [0, {num_classes}) for {num_classes} classes. HINT: mark "
            f"positions to skip with `ignore_index` (currently {ignore_index})."
        )


# --------------------------------------------------------------------------------------------------------------------
# Row selection and math on (N, C) rows
# --------------------------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _keep(target: Tensor | None, mask: Tensor | None, ignore_index: int, device: torch.device) -> Tensor | None:
    """Flat bool selector of the counted positions, or ``None`` when every position counts (no copy needed)."""
    keep = None if mask is None else mask.reshape(-1).to(device)
    if target is not None:
        labelled = target.reshape(-1) != ignore_index
        keep = labelled if keep is None else keep & labelled
    if keep is not None and bool(keep.all()):
        return None
    return keep


def _select(
    target: Tensor | None, mask: Tensor | None, ignore_index: int, num_classes: int, device: torch.device
) -> tuple[Tensor | None, bool]:
    """The counted-position selector (see :func:`_keep`) and whether the targets are already known to be in range.

    The common case, no mask and no ignored target, is settled by one ``aminmax`` (one device sync): every position
    counts and every target is a valid class, so neither a selection nor a second range check is needed.
    """
    if mask is None and target is not None and target.numel():
        low, high = (int(v) for v in torch.aminmax(target))
        if 0 <= low and high < num_classes and not low <= ignore_index <= high:
            return None, True
    return _keep(target, mask, ignore_index, device), False


def _rows(x: Tensor, keep: Tensor | None) -> Tensor:
    """Flatten the leading dims of ``x`` and keep the counted rows (one boolean-index pass)."""
    if keep is None and x.ndim == 2:
        return x  # already (N, C): no view, so no extra autograd node
    flat = x.reshape(-1, x.shape[-1])
    return flat if keep is None else flat[keep]


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    # -inf logits (masked vocabulary) would give 0 * (-inf) = NaN in the KL sum; the most negative finite value
    # gives the same probability (zero) without the NaN. Finite log-probabilities are untouched.
    scaled = logits if temperature == 1.0 else logits / temperature
    return F.log_softmax(scaled, dim=-1).clamp(min=torch.finfo(logits.dtype).min)


def _log_mixture(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``log((p + q) / 2)``: the two-term logsumexp minus log 2, written so that ``p == q`` gives ``log p`` exactly."""
    # log((e^a + e^b) / 2) = max(a, b) + log((1 + e^-|a-b|) / 2) = max(a, b) + log1p(expm1(-|a-b|) / 2)
    return torch.maximum(log_p, log_q) + torch.log1p(0.5 * torch.expm1(-(log_p - log_q).abs()))


def _kl_sum(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` summed over rows and classes of ``(N, C)`` log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True)


def _divergence_mean(student: Tensor, teacher: Tensor, temperature: float, divergence: Divergence) -> Tensor:
    """Mean over the ``(N, C)`` rows (already selected and upcast) of the distillation loss, with the T² factor.

    No rows give a zero that is still attached to the graph. KL and JS are clamped at 0 so rounding never yields a
    (tiny) negative divergence.
    """
    scale = temperature**2 / max(student.shape[0], 1)  # T² and the mean over rows, in one multiplication
    if divergence == "mse":
        return F.mse_loss(student, teacher, reduction="sum") / max(student.numel(), 1)
    log_s = _log_probs(student, temperature)
    log_t = _log_probs(teacher, temperature)
    if divergence == "soft_ce":
        return (log_t.exp() * log_s).sum() * -scale
    if divergence == "kl":
        total = _kl_sum(log_t, log_s)
    elif divergence == "reverse_kl":
        total = _kl_sum(log_s, log_t)
    else:  # "js"
        log_m = _log_mixture(log_t, log_s)
        total = 0.5 * (_kl_sum(log_t, log_m) + _kl_sum(log_s, log_m))
    return (total * scale).clamp(min=0.0)


def _cross_entropy_mean(student: Tensor, target: Tensor) -> Tensor:
    """Hard-label cross-entropy averaged over the selected ``(N, C)`` rows; no rows give an attached zero."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    return F.cross_entropy(student, target.long())


# --------------------------------------------------------------------------------------------------------------------
# Public losses
# --------------------------------------------------------------------------------------------------------------------
def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    divergence: Divergence = "kl",
    mask: Tensor | None = None,
) -> Tensor:
    r"""Distillation loss between student and teacher logits, averaged over the counted positions.

    With :math:`p = \mathrm{softmax}(z / T)` per position and :math:`\mathcal{P}` the counted positions,

    .. math::

        \mathcal{L}_{KD} = \frac{T^2}{|\mathcal{P}|} \sum_{i \in \mathcal{P}} D\big(p_t^{(i)}, p_s^{(i)}\big)

    where :math:`D` is

    - ``"kl"`` (default): :math:`\mathrm{KL}(p_t \| p_s) = \sum_c p_{t,c} (\log p_{t,c} - \log p_{s,c})`, the
      soft-target loss of Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network"; the
      :math:`T^2` factor keeps its gradients on the scale of the hard-label term.
    - ``"reverse_kl"``: :math:`\mathrm{KL}(p_s \| p_t)`, what MNN's ``_DistillLoss``
      (``tools/train/source/optimizer/Loss.cpp``, used by its distillation example
      ``tools/train/source/demo/distillTrainQuant.cpp`` with ``T=20, alpha=0.9``) computes.
    - ``"soft_ce"``: :math:`-\sum_c p_{t,c} \log p_{s,c} = \mathrm{KL}(p_t \| p_s) + H(p_t)`, Intel Neural
      Compressor's ``KnowledgeDistillationLoss`` with loss type ``"CE"``
      (``neural_compressor/compression/distillation/criterions.py``). It differs from ``"kl"`` by the teacher's
      entropy, a constant for the student, so the student's gradients are the same but the value is not zero
      when the distributions match.
    - ``"js"``: Jensen-Shannon, :math:`\tfrac12 \mathrm{KL}(p_t \| m) + \tfrac12 \mathrm{KL}(p_s \| m)` with
      :math:`m = (p_t + p_s) / 2` formed in log space.
    - ``"mse"``: the squared difference of the **raw** logits, averaged over counted positions *and* classes:
      :math:`\frac{1}{|\mathcal{P}| C} \sum_{i, c} (z_{s,c}^{(i)} - z_{t,c}^{(i)})^2`. No temperature and no
      :math:`T^2` (``temperature`` is ignored).

    Args:
        student_logits: Student logits ``(*, C)``, e.g. ``(B, C)`` or ``(B, L, V)``; any floating dtype.
        teacher_logits: Teacher logits of the same shape.
        temperature: Softmax temperature :math:`T > 0`.
        divergence: Which :math:`D` to use (see above).
        mask: Optional bool tensor of shape ``(*)``; ``True`` marks positions that count.

    Returns:
        A scalar tensor, float32 (float64 if an input is float64). Zero when no position counts.

    Raises:
        ValueError: If the shapes differ, ``mask`` is not a bool tensor of shape ``(*)``, ``temperature`` is not
            finite and positive, or ``divergence`` is unknown.

    Example::

        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> round(kd_loss(s, t, temperature=2.0).item(), 4)
        0.2064
        >>> round(kd_loss(s, t, divergence="js").item(), 4)
        0.0368
        >>> kd_loss(s, s).item()
        0.0
    """
    temperature = check_temperature(temperature)
    check_divergence(divergence)
    _check_pair(student_logits, teacher_logits)
    _check_mask(mask, tuple(student_logits.shape[:-1]))
    keep = _keep(None, mask, 0, student_logits.device)
    dtype = _compute_dtype(student_logits, teacher_logits)
    student = _rows(student_logits, keep).to(dtype)
    teacher = _rows(teacher_logits, keep).to(dtype)
    return _divergence_mean(student, teacher, temperature, divergence)


def cross_entropy(
    student_logits: Tensor,
    target: Tensor,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""Cross-entropy with hard labels (temperature 1), averaged over the counted positions.

    .. math::

        \mathcal{L}_{CE} = -\frac{1}{|\mathcal{P}|} \sum_{i \in \mathcal{P}} \log \mathrm{softmax}(z_s^{(i)})_{y_i}

    where :math:`\mathcal{P}` holds the positions with ``mask`` true and ``target != ignore_index``. Without a mask
    this equals ``F.cross_entropy(student_logits.flatten(0, -2), target.flatten())``.

    Args:
        student_logits: Student logits ``(*, C)``.
        target: Class indices ``(*)``, integer dtype; ``ignore_index`` marks positions to skip.
        mask: Optional bool tensor of shape ``(*)``; ``True`` marks positions that count.
        ignore_index: Target value whose positions are skipped.

    Returns:
        A scalar tensor, float32 (float64 for float64 logits). Zero when no position counts.

    Raises:
        ValueError: If ``target`` is not an integer tensor of shape ``(*)``, holds a class index outside
            ``[0, C)`` at a counted position, or ``mask`` is not a bool tensor of shape ``(*)``.

    Example::

        >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
        >>> round(cross_entropy(logits, torch.tensor([0, 2])).item(), 4)
        0.8139
        >>> round(cross_entropy(logits, torch.tensor([0, -100])).item(), 4)
        0.1698
    """
    _check_logits("student logits", student_logits)
    ignore_index = _check_ignore_index(ignore_index)
    lead_shape = tuple(student_logits.shape[:-1])
    _check_target(target, lead_shape)
    _check_mask(mask, lead_shape)
    keep, in_range = _select(target, mask, ignore_index, student_logits.shape[-1], student_logits.device)
    target_rows = _rows(target.unsqueeze(-1), keep).squeeze(-1)
    if not in_range:
        _check_target_range(target_rows, student_logits.shape[-1], ignore_index)
    student = _rows(student_logits, keep).to(_compute_dtype(student_logits))
    return _cross_entropy_mean(student, target_rows)


def distillation_loss_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: Divergence = "kl",
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    r"""The distillation objective and its two parts.

    .. math::

        \mathcal{L} = \alpha \, \mathcal{L}_{KD}(z_s, z_t; T) + (1 - \alpha) \, \mathcal{L}_{CE}(z_s, y)

    with :math:`\mathcal{L}_{KD}` from :func:`kd_loss` and :math:`\mathcal{L}_{CE}` from :func:`cross_entropy` (at
    temperature 1). Both terms average over the **same** positions: ``mask`` true and ``target != ignore_index``.

    :math:`\alpha` weights the distillation term, as in MNN's ``_DistillLoss``, Intel Neural Compressor's
    ``KnowledgeDistillationLoss(loss_weights=[1 - alpha, alpha])`` and NVIDIA ModelOpt; torchdistill's ``KDLoss``
    uses the opposite convention (its ``alpha`` weights the hard-label term). So MNN's loss (``T=20``,
    ``alpha=0.9``) is ``divergence="reverse_kl", temperature=20, alpha=0.9``, and INC's ``loss_types=["CE", "CE"]``
    is ``divergence="soft_ce"``.

    Args:
        student_logits: Student logits ``(*, C)``, e.g. ``(B, C)`` or ``(B, L, V)``.
        teacher_logits: Teacher logits of the same shape.
        target: Class indices ``(*)``, or ``None`` for pure distillation on unlabelled data (needs ``alpha=1.0``).
        alpha: Weight of the distillation term, in ``[0, 1]``.
        temperature: Softmax temperature of the distillation term, ``> 0``.
        divergence: ``"kl"``, ``"reverse_kl"``, ``"soft_ce"``, ``"js"`` or ``"mse"`` (see :func:`kd_loss`).
        mask: Optional bool tensor of shape ``(*)``; ``True`` marks positions that count.
        ignore_index: Target value whose positions are left out of both terms.

    Returns:
        ``{"loss": ..., "task_loss": ..., "kd_loss": ...}``, scalar tensors (float32, or float64 for float64
        inputs). ``task_loss`` is 0 when ``target`` is ``None``.

    Raises:
        ValueError: On a bad hyper-parameter, mismatched logits shapes, a bad ``mask`` or ``target``, or
            ``target=None`` with ``alpha < 1``.

    Example::

        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> terms = distillation_loss_terms(s, t, torch.tensor([0, 2]), alpha=0.9, temperature=2.0)
        >>> {name: round(value.item(), 4) for name, value in terms.items()}
        {'loss': 0.2671, 'task_loss': 0.8139, 'kd_loss': 0.2064}
    """
    alpha = check_alpha(alpha)
    temperature = check_temperature(temperature)
    check_divergence(divergence)
    ignore_index = _check_ignore_index(ignore_index)
    _check_pair(student_logits, teacher_logits)
    lead_shape = tuple(student_logits.shape[:-1])
    _check_mask(mask, lead_shape)
    if target is None:
        if alpha != 1.0:
            raise ValueError(
                f"`target` is None but `alpha` is {alpha!r}, so the task term (weight {1.0 - alpha!r}) has no labels. "
                "HINT: pass alpha=1.0 for pure distillation on unlabelled data."
            )
    else:
        _check_target(target, lead_shape)

    keep, in_range = _select(target, mask, ignore_index, student_logits.shape[-1], student_logits.device)
    dtype = _compute_dtype(student_logits, teacher_logits)
    student = _rows(student_logits, keep).to(dtype)
    teacher = _rows(teacher_logits, keep).to(dtype)
    kd = _divergence_mean(student, teacher, temperature, divergence)
    if target is None:
        task = kd.new_zeros(())
    else:
        target_rows = _rows(target.unsqueeze(-1), keep).squeeze(-1)
        if not in_range:
            _check_target_range(target_rows, student_logits.shape[-1], ignore_index)
        task = _cross_entropy_mean(student, target_rows)
    return {"loss": alpha * kd + (1.0 - alpha) * task, "task_loss": task, "kd_loss": kd}


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: Divergence = "kl",
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""The distillation objective :math:`\alpha \mathcal{L}_{KD} + (1 - \alpha) \mathcal{L}_{CE}` as one scalar.

    Same arguments, conventions and errors as :func:`distillation_loss_terms`, which also returns the two parts.

    .. math::

        \mathcal{L} = \alpha \, T^2 \, \overline{D(p_t, p_s)} + (1 - \alpha) \, \overline{\mathrm{CE}(z_s, y)}

    Args:
        student_logits: Student logits ``(*, C)``.
        teacher_logits: Teacher logits of the same shape.
        target: Class indices ``(*)``, or ``None`` together with ``alpha=1.0``.
        alpha: Weight of the distillation term (MNN / INC / ModelOpt convention; torchdistill's is ``1 - alpha``).
        temperature: Softmax temperature of the distillation term.
        divergence: See :func:`kd_loss`.
        mask: Optional bool tensor of shape ``(*)``.
        ignore_index: Target value whose positions are left out of both terms.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: See :func:`distillation_loss_terms`.

    Example::

        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> round(distillation_loss(s, t, torch.tensor([0, 2]), alpha=0.9, temperature=20.0,
        ...                         divergence="reverse_kl").item(), 4)
        0.2702
        >>> round(distillation_loss(s, t, None, alpha=1.0, temperature=2.0).item(), 4)
        0.2064
    """
    return distillation_loss_terms(
        student_logits,
        teacher_logits,
        target,
        alpha=alpha,
        temperature=temperature,
        divergence=divergence,
        mask=mask,
        ignore_index=ignore_index,
    )["loss"]
