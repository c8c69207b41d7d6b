r"""Logit-level distillation losses: :func:`kd_loss`, :func:`cross_entropy` and their composition.

Masked classes (``-inf`` logits) follow :math:`0 \log 0 = 0` and the floor :math:`L = -10^4` of the package's
conventions (:mod:`lightning_distill.losses.functional`): a class without mass under the distribution an expectation
is taken over contributes 0, one the other model masks contributes a large but finite term.
"""

from __future__ import annotations

import torch  # noqa: F401  (the examples in the docstrings below run in this module's namespace)
from torch import Tensor

from lightning_distill.losses.functional._chunked import chunked_row_sum
from lightning_distill.losses.functional._common import (
    Divergence,
    check_alpha,
    check_chunk_size,
    check_divergence,
    check_ignore_index,
    check_js_beta,
    check_logits,
    check_mask,
    check_pair,
    check_target,
    check_target_range,
    check_temperature,
    check_weight,
    compute_dtype,
    counted_positions,
    counted_rows,
    cross_entropy_mean,
    flat_rows,
    kl_sum,
    log_mixture,
    log_probs,
    mse_row_sum,
    select_counted,
)
from lightning_distill.losses.functional.dkd import _check_dkd_inputs, _dkd_means

__all__ = ["cross_entropy", "distillation_loss", "distillation_loss_terms", "kd_loss", "weigh_terms"]


def _divergence_mean(
    student: Tensor, teacher: Tensor, temperature: float, divergence: Divergence, js_beta: float = 0.5
) -> Tensor:
    """Mean over the ``(N, C)`` rows (already selected and upcast) of the distillation loss, with the T² factor.

    No rows give a zero that is still attached to the graph. KL and JS are clamped at 0 so rounding never yields a
    (tiny) negative divergence. Masked (``-inf``) classes: see :func:`log_probs` and :func:`mse_row_sum`.
    """
    scale = temperature**2 / max(student.shape[0], 1)  # T² and the mean over rows, in one multiplication
    if divergence == "mse":
        return mse_row_sum(student, teacher) / max(student.shape[0], 1)
    log_s = log_probs(student, temperature)
    log_t = log_probs(teacher, temperature)
    if divergence == "soft_ce":
        return (log_t.exp() * log_s).sum() * -scale
    if divergence == "kl":
        total = kl_sum(log_t, log_s)
    elif divergence == "reverse_kl":
        total = kl_sum(log_s, log_t)
    else:  # "js" (generalized with js_beta, GKD's JSD(beta))
        log_m = log_mixture(log_t, log_s, js_beta)
        total = js_beta * kl_sum(log_t, log_m) + (1.0 - js_beta) * kl_sum(log_s, log_m)
    return (total * scale).clamp(min=0.0)


def _kd_terms(
    student: Tensor,
    teacher: Tensor,
    target: Tensor | None,
    temperature: float,
    divergence: Divergence,
    tckd_weight: float,
    nckd_weight: float,
    js_beta: float = 0.5,
) -> dict[str, Tensor]:
    """``{"kd_loss"}`` over the selected ``(N, C)`` rows; ``"dkd"`` adds its unweighted ``tckd_loss``, ``nckd_loss``."""
    if divergence != "dkd":
        return {"kd_loss": _divergence_mean(student, teacher, temperature, divergence, js_beta)}
    assert target is not None  # checked by _check_dkd_inputs
    tckd, nckd = _dkd_means(student, teacher, target, temperature)
    return {"kd_loss": tckd_weight * tckd + nckd_weight * nckd, "tckd_loss": tckd, "nckd_loss": nckd}


def _check_chunking(chunk_size: int | None, divergence: Divergence) -> int | None:
    chunk_size = check_chunk_size(chunk_size)
    if chunk_size is not None and divergence == "dkd":
        raise ValueError("`chunk_size` is not supported with divergence='dkd'. HINT: pass chunk_size=None.")
    return chunk_size


def _chunk_sum(
    student: Tensor, teacher: Tensor, keep: Tensor | None, temperature: float, divergence: Divergence, js_beta: float
) -> Tensor:
    """Sum over the counted rows of one chunk of the divergence (with T²); the float32 copies live only here."""
    if keep is not None:
        student, teacher = student[keep], teacher[keep]
    dtype = compute_dtype(student, teacher)
    rows = student.shape[0]
    return _divergence_mean(student.to(dtype), teacher.to(dtype), temperature, divergence, js_beta) * rows


def _chunked_kd_mean(
    student_logits: Tensor,
    teacher_logits: Tensor,
    keep: Tensor | None,
    temperature: float,
    divergence: Divergence,
    js_beta: float,
    chunk_size: int,
) -> Tensor:
    """The KD mean over counted positions, ``chunk_size`` positions at a time (see :func:`chunked_row_sum`).

    The result equals the unchunked mean up to summation order; at most one chunk's ``(chunk_size, C)`` float32
    intermediates are alive at a time, never the whole ``(N, C)``.
    """
    classes = student_logits.shape[-1]
    flat_s, flat_t = student_logits.reshape(-1, classes), teacher_logits.reshape(-1, classes)
    count = flat_s.shape[0] if keep is None else int(keep.sum())

    def chunk_sum(student: Tensor, teacher: Tensor, rows: Tensor | None) -> Tensor:
        return _chunk_sum(student, teacher, rows, temperature, divergence, js_beta)

    total = chunked_row_sum(chunk_sum, [flat_s, flat_t, keep], chunk_size)
    return total / max(count, 1)


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
    target: Tensor | None = None,
    ignore_index: int = -100,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
    js_beta: float = 0.5,
    chunk_size: int | None = None,
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
    - ``"js"``: generalized Jensen-Shannon (GKD's JSD(β), Agarwal et al., 2024),
      :math:`\beta \, \mathrm{KL}(p_t \| m) + (1 - \beta) \, \mathrm{KL}(p_s \| m)` with
      :math:`m = \beta p_t + (1 - \beta) p_s` formed in log space; ``js_beta`` :math:`= \beta`, default 0.5 (the
      symmetric Jensen-Shannon divergence). Small β leans to the teacher's support (forward-KL-like), large β to
      the student's.
    - ``"mse"``: the squared difference of the **raw** logits, averaged over counted positions *and* classes:
      :math:`\frac{1}{|\mathcal{P}| C} \sum_{i, c} (z_{s,c}^{(i)} - z_{t,c}^{(i)})^2` (classes masked on both
      sides left out, see below). No temperature and no :math:`T^2` (``temperature`` is ignored).
    - ``"dkd"``: decoupled KD (Zhao et al., 2022),
      :math:`w_{TC} \, \mathrm{KL}(b_t \| b_s) + w_{NC} \, \mathrm{KL}(\hat p_t \| \hat p_s)` with
      :math:`b = [p_y, 1 - p_y]` and :math:`\hat p` the softmax over the non-target classes; needs ``target``
      and ``C >= 2``. See :func:`~lightning_distill.losses.functional.dkd.dkd_loss`.

    **Masked classes** (``-inf`` logits): :math:`0 \log 0 = 0`. Every :math:`D` but ``"mse"`` is computed on
    :math:`\ell_c = \max(\log p_c, L)`, :math:`L = -10^4`, so a term :math:`p_c (\log p_c - \log q_c)` of an
    expectation over :math:`p` is

    .. math::

        0 \ \text{if } p_c = 0, \qquad p_c (\log p_c - L) \ \text{if } p_c > 0 = q_c \ \text{(infinite, kept finite)}

    with finite gradients. Classes masked by both models drop out; forward KL and ``"soft_ce"`` ignore classes the
    teacher masks, ``"reverse_kl"`` those the student masks; ``"js"`` has no infinite case. ``"mse"`` compares
    :math:`\max(z, L)` and leaves classes masked on both sides out of a position's mean over classes. A position
    whose logits are all ``-inf``, or a NaN, gives a NaN loss (a fault, not a mask).

    Args:
        student_logits: Student logits ``(*, C)``, e.g. ``(B, C)`` or ``(B, L, V)``; any floating dtype.
        teacher_logits: Teacher logits of the same shape.
        temperature: Softmax temperature :math:`T > 0`.
        divergence: Which :math:`D` to use (see above).
        mask: Optional bool tensor of shape ``(*)``; ``True`` marks positions that count.
        target: Optional class indices ``(*)``, required by ``"dkd"``. When given, positions whose target equals
            ``ignore_index`` do not count (for every divergence, as in :func:`distillation_loss`).
        ignore_index: Target value whose positions are skipped; unused without ``target``.
        tckd_weight: Weight :math:`w_{TC} \ge 0` of DKD's target-class term; only used by ``"dkd"``.
        nckd_weight: Weight :math:`w_{NC} \ge 0` of DKD's non-target-class term; only used by ``"dkd"``.
        js_beta: The teacher's weight :math:`\beta \in (0, 1)` in ``"js"``'s mixture; only used by ``"js"``.
        chunk_size: Compute the divergence over at most this many positions at a time (large vocabularies): the
            float32 probabilities of one chunk are alive at a time, in forward and (recomputed) in backward. Not for
            ``"dkd"``. ``None`` (default): all positions at once.

    Returns:
        A scalar tensor, float32 (float64 if an input is float64). Zero when no position counts.

    Raises:
        ValueError: If the shapes differ, ``mask`` is not a bool tensor of shape ``(*)``, ``target`` is not an
            integer tensor of shape ``(*)`` with indices in ``[0, C)`` at counted positions, ``temperature`` is not
            finite and positive, a DKD weight is negative or not finite, ``divergence`` is unknown, or it is
            ``"dkd"`` without ``target`` or with ``C < 2``.

    Example::

        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> round(kd_loss(s, t, temperature=2.0).item(), 4)
        0.2064
        >>> round(kd_loss(s, t, divergence="js").item(), 4)
        0.0368
        >>> kd_loss(s, s).item()
        0.0
        >>> round(kd_loss(s, t, temperature=2.0, divergence="dkd", target=torch.tensor([0, 1])).item(), 4)
        0.7835
    """
    temperature = check_temperature(temperature)
    check_divergence(divergence)
    tckd_weight = check_weight("tckd_weight", tckd_weight)
    nckd_weight = check_weight("nckd_weight", nckd_weight)
    ignore_index = check_ignore_index(ignore_index)
    check_pair(student_logits, teacher_logits)
    lead_shape = tuple(student_logits.shape[:-1])
    check_mask(mask, lead_shape)
    if divergence == "dkd":
        _check_dkd_inputs(target, student_logits.shape[-1])
    if target is not None:
        check_target(target, lead_shape)
    js_beta = check_js_beta(js_beta)
    chunk = _check_chunking(chunk_size, divergence)
    if chunk is not None:
        keep = counted_positions(target, mask, ignore_index, student_logits.device)
        if target is not None:  # the counted targets must be classes, as on the unchunked path
            counted = target.reshape(-1) if keep is None else target.reshape(-1)[keep]
            check_target_range(counted, student_logits.shape[-1], ignore_index)
        return _chunked_kd_mean(student_logits, teacher_logits, keep, temperature, divergence, js_beta, chunk)
    student, teacher, target_rows = counted_rows(student_logits, teacher_logits, target, mask, ignore_index)
    terms = _kd_terms(student, teacher, target_rows, temperature, divergence, tckd_weight, nckd_weight, js_beta)
    return terms["kd_loss"]


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
    check_logits("student logits", student_logits)
    ignore_index = check_ignore_index(ignore_index)
    lead_shape = tuple(student_logits.shape[:-1])
    check_target(target, lead_shape)
    check_mask(mask, lead_shape)
    keep, in_range = select_counted(target, mask, ignore_index, student_logits.shape[-1], student_logits.device)
    target_rows = flat_rows(target.unsqueeze(-1), keep).squeeze(-1)
    if not in_range:
        check_target_range(target_rows, student_logits.shape[-1], ignore_index)
    student = flat_rows(student_logits, keep).to(compute_dtype(student_logits))
    return cross_entropy_mean(student, target_rows)


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
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
    js_beta: float = 0.5,
    chunk_size: int | None = None,
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
        divergence: ``"kl"``, ``"reverse_kl"``, ``"soft_ce"``, ``"js"``, ``"mse"`` or ``"dkd"`` (see :func:`kd_loss`).
        mask: Optional bool tensor of shape ``(*)``; ``True`` marks positions that count.
        ignore_index: Target value whose positions are left out of both terms.
        tckd_weight: Weight of DKD's target-class term, ``>= 0``; only used by ``"dkd"``.
        nckd_weight: Weight of DKD's non-target-class term, ``>= 0``; only used by ``"dkd"``.
        js_beta: The teacher's weight in ``"js"``'s mixture, in ``(0, 1)`` (see :func:`kd_loss`).
        chunk_size: Compute the KD term over at most this many positions at a time (see :func:`kd_loss`); the
            cross-entropy term is not chunked.

    Returns:
        ``{"loss": ..., "task_loss": ..., "kd_loss": ...}``, scalar tensors (float32, or float64 for float64
        inputs). ``task_loss`` is 0 when ``target`` is ``None``. For ``"dkd"`` also ``"tckd_loss"`` and
        ``"nckd_loss"``, the two parts unweighted (with the :math:`T^2` factor), so that
        ``kd_loss = tckd_weight * tckd_loss + nckd_weight * nckd_loss``.

    Raises:
        ValueError: On a bad hyper-parameter, mismatched logits shapes, a bad ``mask`` or ``target``,
            ``target=None`` with ``alpha < 1`` or with ``divergence="dkd"``, or ``"dkd"`` with ``C < 2``.

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
    tckd_weight = check_weight("tckd_weight", tckd_weight)
    nckd_weight = check_weight("nckd_weight", nckd_weight)
    ignore_index = check_ignore_index(ignore_index)
    check_pair(student_logits, teacher_logits)
    lead_shape = tuple(student_logits.shape[:-1])
    check_mask(mask, lead_shape)
    if divergence == "dkd":
        _check_dkd_inputs(target, student_logits.shape[-1])
    if target is None:
        weigh_terms(student_logits.new_zeros(()), None, alpha)  # refuses a task weight without labels, early
    else:
        check_target(target, lead_shape)

    js_beta = check_js_beta(js_beta)
    chunk = _check_chunking(chunk_size, divergence)
    if chunk is not None:
        keep = counted_positions(target, mask, ignore_index, student_logits.device)
        kd = _chunked_kd_mean(student_logits, teacher_logits, keep, temperature, divergence, js_beta, chunk)
        task = None if target is None else cross_entropy(student_logits, target, mask=mask, ignore_index=ignore_index)
        return weigh_terms(kd, task, alpha)
    student, teacher, target_rows = counted_rows(student_logits, teacher_logits, target, mask, ignore_index)
    terms = _kd_terms(student, teacher, target_rows, temperature, divergence, tckd_weight, nckd_weight, js_beta)
    kd = terms.pop("kd_loss")
    task = None if target_rows is None else cross_entropy_mean(student, target_rows)
    return {**weigh_terms(kd, task, alpha), **terms}


def weigh_terms(kd: Tensor, task: Tensor | None, alpha: float) -> dict[str, Tensor]:
    r"""The alpha-weighting of a distillation loss, :math:`\alpha \mathcal{L}_{KD} + (1 - \alpha) \mathcal{L}_{task}`.

    The one place the library weighs the two terms (:func:`distillation_loss_terms`, the top-k cache's terms and
    :class:`~lightning_distill.DistillationObjective` all call it). ``task=None`` (no labels) is pure distillation,
    which needs ``alpha=1``: its ``task_loss`` is a zero.

    Raises:
        ValueError: For ``task=None`` with ``alpha != 1``.

    Example::

        >>> terms = weigh_terms(torch.tensor(2.0), torch.tensor(4.0), alpha=0.25)
        >>> {name: value.item() for name, value in terms.items()}
        {'loss': 3.5, 'task_loss': 4.0, 'kd_loss': 2.0}
    """
    if task is None:
        if alpha != 1.0:
            raise ValueError(
                f"`target` is None but `alpha` is {alpha!r}, so the task term (weight {1.0 - alpha!r}) has no labels. "
                "HINT: pass alpha=1.0 for pure distillation on unlabelled data."
            )
        task = kd.new_zeros(())
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
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
    js_beta: float = 0.5,
    chunk_size: int | None = None,
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
        tckd_weight: Weight of DKD's target-class term; only used by ``"dkd"``.
        nckd_weight: Weight of DKD's non-target-class term; only used by ``"dkd"``.
        js_beta: The teacher's weight in ``"js"``'s mixture (see :func:`kd_loss`).
        chunk_size: Compute the KD term over at most this many positions at a time (see :func:`kd_loss`).

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
        tckd_weight=tckd_weight,
        nckd_weight=nckd_weight,
        js_beta=js_beta,
        chunk_size=chunk_size,
    )["loss"]
