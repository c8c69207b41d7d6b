"""Decoupled knowledge distillation (DKD, Zhao et al., CVPR 2022): :func:`dkd_loss`."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_distill.losses.functional._common import (
    LOG_ZERO,
    check_ignore_index,
    check_mask,
    check_pair,
    check_target,
    check_temperature,
    check_weight,
    counted_rows,
    kl_sum,
    log_probs,
)

__all__ = ["dkd_loss"]


def _check_dkd_inputs(target: Tensor | None, num_classes: int) -> None:
    """Raise unless decoupled KD can run: it needs class targets and at least two classes."""
    if target is None:
        raise ValueError(
            "`divergence='dkd'` needs `target` (class indices): decoupled KD splits each distribution at the target "
            "class. HINT: pass `target=`; for unlabelled data choose a divergence that needs no labels, e.g. 'kl'."
        )
    if num_classes < 2:
        raise ValueError(
            f"Decoupled KD needs at least 2 classes (a target and a non-target part), got logits with {num_classes} "
            "class(es) in the last dimension."
        )


def _drop_target(x: Tensor, target: Tensor) -> Tensor:
    """``(N, C)`` -> ``(N, C - 1)``: each row without its target column, the other columns in order.

    A gather with computed indices (columns at or after the target shift by one), so there is no ``-inf`` fill and,
    unlike boolean indexing, no device sync.
    """
    n, c = x.shape
    cols = torch.arange(c - 1, device=x.device).expand(n, c - 1)
    return x.gather(1, cols + (cols >= target).long())


def _dkd_means(
    student_rows: Tensor, teacher_rows: Tensor, target_rows: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    r"""TCKD and NCKD averaged over the ``(N, C)`` rows (already selected and upcast), each with the T² factor.

    Everything stays in log space, on the log-probabilities floored at :data:`LOG_ZERO` (a ``-inf`` logit counts as
    :math:`L`): :math:`\log(1 - p_y)` is the logsumexp of the non-target log-probabilities and :math:`\log \hat p`
    their difference from it, so neither term can meet ``0 * (-inf - -inf)``. A row with no non-target mass (every
    non-target class at the floor) has no :math:`\hat p` (it would be 0/0): its :math:`\log \hat p` is :math:`L`
    throughout, so its NCKD vanishes on the teacher's side and is :math:`\sum_c \hat p_{t,c} (\log \hat p_{t,c} - L)`
    on the student's. With ``C = 2`` the non-target part has one class and NCKD is exactly 0. No rows give zeros
    still attached to the graph; both terms are clamped at 0 against rounding.
    """
    target = target_rows.long().unsqueeze(1)
    log_s = log_probs(student_rows, temperature)
    log_t = log_probs(teacher_rows, temperature)

    def split(log_p: Tensor) -> tuple[Tensor, Tensor]:
        others = _drop_target(log_p, target)
        rest = torch.logsumexp(others, dim=1, keepdim=True)  # log(1 - p_y)
        binary = torch.cat([log_p.gather(1, target), rest], dim=1)
        no_mass = others.amax(dim=1, keepdim=True) <= LOG_ZERO
        return binary, torch.where(no_mass, LOG_ZERO, others - rest)

    binary_s, others_s = split(log_s)
    binary_t, others_t = split(log_t)
    scale = temperature**2 / max(student_rows.shape[0], 1)
    tckd = (kl_sum(binary_t, binary_s) * scale).clamp(min=0.0)
    nckd = (kl_sum(others_t, others_s) * scale).clamp(min=0.0)
    return tckd, nckd


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""Decoupled knowledge distillation loss, averaged over the counted positions.

    Zhao, Cui, Song, Qiu & Liang (2022), "Decoupled Knowledge Distillation", CVPR; official code: mdistiller,
    ``mdistiller/distillers/DKD.py`` (``dkd_loss``). With :math:`p = \mathrm{softmax}(z / T)` and :math:`y` the
    target class of a position, the KL loss splits into a target and a non-target part:

    .. math::

        b = \big[p_y,\ 1 - p_y\big], \qquad
        \hat p_c = \frac{p_c}{1 - p_y} \ (c \neq y), \qquad
        \mathrm{KL}(p_t \| p_s) = \mathrm{KL}(b_t \| b_s) + (1 - p_{t,y}) \, \mathrm{KL}(\hat p_t \| \hat p_s)

    and DKD weights the two parts with constants instead of the coupling factor :math:`1 - p_{t,y}`:

    .. math::

        \mathcal{L}_{DKD} = \frac{T^2}{|\mathcal{P}|} \sum_{i \in \mathcal{P}}
        \Big(w_{TC} \, \mathrm{KL}\big(b_t^{(i)} \| b_s^{(i)}\big)
        + w_{NC} \, \mathrm{KL}\big(\hat p_t^{(i)} \| \hat p_s^{(i)}\big)\Big)

    ``tckd_weight`` (:math:`w_{TC}`) is the paper's :math:`\alpha` and ``nckd_weight`` (:math:`w_{NC}`) its
    :math:`\beta`; the defaults 1 and 8 are the paper's CIFAR-100 setting (it uses :math:`T = 4`). :math:`\hat p` is
    the softmax over the non-target classes only (the target column is dropped, not filled with ``-inf``), and
    :math:`\log(1 - p_y)` is a logsumexp of the non-target log-probabilities, so large logits give no NaN. With
    ``C = 2`` the NCKD term is exactly 0.

    Masked classes (``-inf`` logits) follow :math:`0 \log 0 = 0` as in
    :func:`~lightning_distill.losses.functional.kd_loss`: the log-probabilities are floored at :math:`L = -10^4`
    before the split, so a class (or the non-target bucket, or :math:`\hat p_c`) the teacher gives no mass
    contributes exactly 0, and one only the student masks contributes :math:`b_{t}(\log b_{t} - \log b_{s})` or
    :math:`\hat p_{t,c} (\log \hat p_{t,c} - \log \hat p_{s,c})` with the student's log-probability at the
    floor: large but finite. A teacher with no non-target mass (:math:`p_{t,y} = 1`) has no :math:`\hat p_t`
    (0/0): its NCKD is 0. A student with none counts :math:`\log \hat p_{s,c} = L` for every class.

    The paper also warms the DKD term up linearly over the first epochs (mdistiller multiplies it by
    ``min(epoch / warmup, 1)``); that is a schedule on the weights, left to the caller.

    Args:
        student_logits: Student logits ``(*, C)`` with ``C >= 2``, e.g. ``(B, C)`` or ``(B, L, V)``.
        teacher_logits: Teacher logits of the same shape.
        target: Class indices ``(*)``, integer dtype; ``ignore_index`` marks positions to skip.
        temperature: Softmax temperature :math:`T > 0`.
        tckd_weight: Weight :math:`w_{TC} \ge 0` of the target-class term (TCKD).
        nckd_weight: Weight :math:`w_{NC} \ge 0` of the non-target-class term (NCKD).
        mask: Optional bool tensor of shape ``(*)``; ``True`` marks positions that count.
        ignore_index: Target value whose positions are skipped.

    Returns:
        A scalar tensor, float32 (float64 if an input is float64). Zero when no position counts.

    Raises:
        ValueError: If the shapes differ, ``C < 2``, ``target`` is missing, not an integer tensor of shape ``(*)`` or
            holds a class index outside ``[0, C)`` at a counted position, ``mask`` is not a bool tensor of shape
            ``(*)``, ``temperature`` is not finite and positive, or a weight is negative or not finite.

    Example::

        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> y = torch.tensor([0, 1])
        >>> round(dkd_loss(s, t, y, temperature=2.0).item(), 4)
        0.7835
        >>> round(dkd_loss(s, t, y, temperature=2.0, nckd_weight=0.0).item(), 4)  # TCKD alone
        0.1639
        >>> round(dkd_loss(s, t, torch.tensor([0, -100]), temperature=2.0).item(), 4)  # first position only
        1.2463
        >>> dkd_loss(s, s, y).item()
        0.0
    """
    temperature = check_temperature(temperature)
    tckd_weight = check_weight("tckd_weight", tckd_weight)
    nckd_weight = check_weight("nckd_weight", nckd_weight)
    ignore_index = check_ignore_index(ignore_index)
    check_pair(student_logits, teacher_logits)
    num_classes = student_logits.shape[-1]
    _check_dkd_inputs(target, num_classes)
    lead_shape = tuple(student_logits.shape[:-1])
    check_target(target, lead_shape)
    check_mask(mask, lead_shape)
    student, teacher, target_rows = counted_rows(student_logits, teacher_logits, target, mask, ignore_index)
    assert target_rows is not None
    tckd, nckd = _dkd_means(student, teacher, target_rows, temperature)
    return tckd_weight * tckd + nckd_weight * nckd
