"""Validation and row helpers shared by the losses (a private module: users import from ``functional``).

Its plain names are shared with the other loss modules (and the library's validation of the same arguments); the
public ones (``check_alpha``, ``check_temperature``, ...) are re-exported by :mod:`lightning_distill.losses.functional`.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, cast, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Literal["kl", "reverse_kl", "soft_ce", "js", "mse", "dkd"]
"""How the student's distribution is compared with the teacher's (see :func:`kd_loss`); ``"dkd"`` needs targets."""

_DIVERGENCES: tuple[str, ...] = get_args(Divergence)


# --------------------------------------------------------------------------------------------------------------------
# Hyper-parameter validation (shared with the module twins and DistillModule)
# --------------------------------------------------------------------------------------------------------------------
def is_real_number(value: object) -> bool:
    """Whether ``value`` is a real number: a Python or NumPy int or float, or a 0-d real tensor; never a bool.

    Example::

        >>> [is_real_number(v) for v in (0.5, 2, True, torch.tensor(4.0), torch.tensor([4.0]), "1")]
        [True, True, False, True, False, False]
    """
    if isinstance(value, Tensor):
        return value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


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
    if not is_real_number(alpha) or not 0.0 <= alpha <= 1.0:
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
    if not is_real_number(temperature) or not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(
            f"`temperature` must be a finite number > 0, got {temperature!r}. HINT: 1.0 leaves the logits unchanged; "
            "Hinton et al. use values between 1 and 20."
        )
    return float(temperature)


def check_weight(name: str, value: float) -> float:
    """Validate a non-negative loss weight (e.g. ``tckd_weight``) and return it as a float.

    Args:
        name: The parameter's name, used in the error message.
        value: The weight; must be a finite number ``>= 0`` (a bool is refused).

    Raises:
        ValueError: If ``value`` is not a finite number ``>= 0``; the message names ``name`` and ``value``.

    Example::

        >>> check_weight("nckd_weight", 8)
        8.0
    """
    if not is_real_number(value) or not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}. HINT: 0.0 switches its term off.")
    return float(value)


def check_js_beta(beta: float) -> float:
    """Return ``beta`` as a float if it is a finite number in ``(0, 1)``; raise ``ValueError`` naming it otherwise.

    Example::

        >>> check_js_beta(0.9)
        0.9
    """
    if not is_real_number(beta) or not 0.0 < float(beta) < 1.0:
        raise ValueError(
            f"`js_beta` must be a number in (0, 1) (the teacher's weight in the JSD mixture), got {beta!r}. HINT: "
            "0.5 is the symmetric Jensen-Shannon divergence; for pure forward or reverse KL use divergence='kl' or "
            "'reverse_kl'."
        )
    return float(beta)


def check_chunk_size(chunk_size: int | None) -> int | None:
    """Return ``chunk_size`` if it is ``None`` or a positive int; raise ``ValueError`` naming it otherwise."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be None or a positive int (positions per chunk), got {chunk_size!r}.")
    return chunk_size


def check_divergence(divergence: str) -> Divergence:
    """Validate the name of a divergence and return it.

    Args:
        divergence: One of ``"kl"``, ``"reverse_kl"``, ``"soft_ce"``, ``"js"``, ``"mse"``, or ``"dkd"`` (decoupled
            KD, which also needs class targets).

    Raises:
        ValueError: If ``divergence`` is not one of the allowed names; the message lists them.

    Example::

        >>> check_divergence("js")
        'js'
    """
    return cast(Divergence, check_choice("divergence", divergence, _DIVERGENCES, " ('dkd' needs class targets)"))


def check_choice(what: str, value: object, options: tuple[str, ...], note: str = "") -> str:
    """Return ``value`` if it is one of the string ``options``, else raise naming ``what``, the options and ``value``.

    Example::

        >>> check_choice("loss", "mse", ("mse", "l1"))
        'mse'
    """
    if not isinstance(value, str) or value not in options:
        allowed = ", ".join(repr(option) for option in options)
        raise ValueError(f"`{what}` must be one of {allowed}{note}, got {value!r}.")
    return value


def check_power(p: float) -> float:
    """Validate the exponent of attention maps (a finite number ``> 0``) and return it as a float."""
    if not is_real_number(p) or not (p > 0.0 and math.isfinite(p)):
        raise ValueError(f"`p` must be a finite number > 0, got {p!r}. HINT: the attention-transfer paper uses p=2.")
    return float(p)


def check_ignore_index(ignore_index: int) -> int:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"`ignore_index` must be an int, got {ignore_index!r}.")
    return ignore_index


# --------------------------------------------------------------------------------------------------------------------
# Tensor validation
# --------------------------------------------------------------------------------------------------------------------
def check_logits(name: str, logits: object) -> Tensor:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}.")
    if logits.ndim < 1 or not logits.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor with the classes in the last dimension, got dtype "
            f"{logits.dtype} and shape {tuple(logits.shape)}."
        )
    return logits


def check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    check_logits("student logits", student_logits)
    check_logits("teacher logits", teacher_logits)
    if student_logits.shape == teacher_logits.shape:
        return
    s_shape, t_shape = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if s_shape[-1] != t_shape[-1] and len(s_shape) >= 3:
        why = (
            f"their per-position class counts differ ({s_shape[-1]} vs {t_shape[-1]}); nothing is truncated. HINT: "
            "for language models the teacher and the student must share a tokenizer (if one only pads its embedding "
            "matrix, slice its logits to the shared vocabulary yourself); token classifiers must share a label set."
        )
    elif s_shape[-1] != t_shape[-1]:
        why = (
            f"class counts differ ({s_shape[-1]} vs {t_shape[-1]}). HINT: the teacher and the student must score the "
            "same label set in the same order; slice or project the teacher's logits first."
        )
    else:
        why = "the leading (position) dimensions differ. HINT: both models must see the same batch."
    raise ValueError(f"student logits {s_shape} and teacher logits {t_shape} must have the same shape, but {why}")


def check_mask(mask: Tensor | None, lead_shape: tuple[int, ...]) -> None:
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


def check_target(target: Tensor, lead_shape: tuple[int, ...]) -> None:
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


def check_target_range(target_rows: Tensor, num_classes: int, ignore_index: int) -> None:
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
def compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32


def counted_positions(
    target: Tensor | None, mask: Tensor | None, ignore_index: int, device: torch.device
) -> Tensor | None:
    """Flat bool selector of the counted positions, or ``None`` when every position counts (no copy needed)."""
    keep = None if mask is None else mask.reshape(-1).to(device)
    if target is not None:
        labelled = target.reshape(-1) != ignore_index
        keep = labelled if keep is None else keep & labelled
    if keep is not None and bool(keep.all()):
        return None
    return keep


def select_counted(
    target: Tensor | None, mask: Tensor | None, ignore_index: int, num_classes: int, device: torch.device
) -> tuple[Tensor | None, bool]:
    """The selector of :func:`counted_positions` and whether the targets are already known to be in range.

    The common case, no mask and no ignored target, is settled by one ``aminmax`` (one device sync): every position
    counts and every target is a valid class, so neither a selection nor a second range check is needed.
    """
    if mask is None and target is not None and target.numel():
        low, high = (int(v) for v in torch.aminmax(target))
        if 0 <= low and high < num_classes and not low <= ignore_index <= high:
            return None, True
    return counted_positions(target, mask, ignore_index, device), False


def flat_rows(x: Tensor, keep: Tensor | None) -> Tensor:
    """Flatten the leading dims of ``x`` and keep the counted rows (one boolean-index pass)."""
    if keep is None and x.ndim == 2:
        return x  # already (N, C): no view, so no extra autograd node
    flat = x.reshape(-1, x.shape[-1])
    return flat if keep is None else flat[keep]


def counted_rows(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, mask: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The counted rows of both logits (upcast) and of ``target`` (range-checked); inputs already validated."""
    num_classes = student_logits.shape[-1]
    keep, in_range = select_counted(target, mask, ignore_index, num_classes, student_logits.device)
    dtype = compute_dtype(student_logits, teacher_logits)
    student = flat_rows(student_logits, keep).to(dtype)
    teacher = flat_rows(teacher_logits, keep).to(dtype)
    if target is None:
        return student, teacher, None
    target_rows = flat_rows(target.unsqueeze(-1), keep).squeeze(-1)
    if not in_range:
        check_target_range(target_rows, num_classes, ignore_index)
    return student, teacher, target_rows


LOG_ZERO = -1.0e4
r"""The log-probability :math:`L` that a zero probability (a ``-inf`` logit, a masked class) counts as.

:math:`e^{L}` and :math:`e^{L + \log C}` (a bucket of :math:`C` such classes) are exactly 0 in float32 and float64, so
a class of zero probability on the side the expectation is taken over contributes exactly 0; on the other side
:math:`p_c (\log p_c - L)` is large (up to :math:`10^4` nats, times :math:`T^2`) but finite, and so are its sums over
rows and its gradients. ``torch.finfo(dtype).min`` (what the losses used before) overflowed to ``inf`` as soon as
two such terms, or one times :math:`T^2 > 1`, were added up.
"""


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    r"""``log_softmax(logits / T)`` floored at :data:`LOG_ZERO`: :math:`\ell_c = \max(\log p_c, L)`.

    A ``-inf`` logit (a masked class) gives :math:`\ell_c = L` instead of ``-inf``, so ``0 * (-inf)`` never makes a
    NaN and its gradient is zero; every divergence is then computed exactly on these floored log-probabilities. A
    finite log-probability below :math:`L` (a logit more than :math:`10^4 T` below the row's largest) is floored the
    same way: it counts as zero probability. A row that is all ``-inf`` (or holds a NaN) stays NaN: that is a fault,
    not a mask, and the training loss's finiteness check reports it.

    Example::

        >>> log_probs(torch.tensor([[0.0, 0.0, float("-inf")]]), 1.0)
        tensor([[-6.9315e-01, -6.9315e-01, -1.0000e+04]])
        >>> log_probs(torch.tensor([[float("-inf"), float("-inf")]]), 1.0)
        tensor([[nan, nan]])
    """
    scaled = logits if temperature == 1.0 else logits / temperature
    return F.log_softmax(scaled, dim=-1).clamp(min=LOG_ZERO)


def log_mixture(log_p: Tensor, log_q: Tensor, beta: float = 0.5) -> Tensor:
    """``log(beta * p + (1 - beta) * q)``; for ``beta = 0.5`` written so that ``p == q`` gives ``log p`` exactly."""
    if beta != 0.5:
        return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    # log((e^a + e^b) / 2) = max(a, b) + log((1 + e^-|a-b|) / 2) = max(a, b) + log1p(expm1(-|a-b|) / 2)
    return torch.maximum(log_p, log_q) + torch.log1p(0.5 * torch.expm1(-(log_p - log_q).abs()))


def kl_sum(log_p: Tensor, log_q: Tensor) -> Tensor:
    r"""``KL(p || q)`` summed over rows and classes of ``(N, C)`` log-probabilities floored by :func:`log_probs`.

    :math:`\sum_c e^{\ell_{p,c}} (\ell_{p,c} - \ell_{q,c})`: a class with :math:`p_c = 0` contributes exactly 0
    (:math:`e^L = 0`), one with :math:`p_c > 0 = q_c` contributes :math:`p_c (\log p_c - L)`, finite.
    """
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True)


def mse_row_sum(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Sum over the ``(N, C)`` rows of each row's mean squared logit difference, masked classes compared on the floor.

    Logits are compared as :math:`\max(z, L)` (:data:`LOG_ZERO`), and a class whose two logits are both ``-inf`` is
    left out of its row's mean:

    .. math::

        \sum_i \frac{1}{|K_i|} \sum_{c \in K_i} \big(\max(z_{s,c}^{(i)}, L) - \max(z_{t,c}^{(i)}, L)\big)^2,
        \qquad K_i = \{c : z_{s,c}^{(i)} > -\infty \text{ or } z_{t,c}^{(i)} > -\infty\}

    So masking the same classes on both sides gives the loss over the other classes, and a class masked on one side
    only costs :math:`(z - L)^2`, large but finite, pulling the other logit down with a finite gradient (leaving it
    out would stop teaching the student anything about a class only the teacher rules out). A row that is all
    ``-inf`` on either side (or holds a NaN) gives NaN: a fault, not a mask.
    """
    compared = student.shape[-1] - torch.maximum(student, teacher).isneginf().sum(-1)  # not -inf on both sides
    faulty = student.amax(-1).isneginf() | teacher.amax(-1).isneginf()  # a row all -inf
    squares = F.mse_loss(student.clamp(min=LOG_ZERO), teacher.clamp(min=LOG_ZERO), reduction="none").sum(-1)
    return torch.where(faulty, math.nan, squares / compared).sum()


def cross_entropy_mean(student: Tensor, target: Tensor) -> Tensor:
    """Hard-label cross-entropy averaged over the selected ``(N, C)`` rows; no rows give an attached zero."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    return F.cross_entropy(student, target.long())
