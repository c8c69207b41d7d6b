r"""KD from a teacher stored as its top-k log-probabilities and the remaining (tail) mass.

A teacher distribution :math:`p` at temperature :math:`T` is kept as the log-probabilities of its k most likely
classes :math:`K` and the tail mass :math:`m = 1 - \sum_{i \in K} p_i`. The KL term is computed with the tail as
one bucket on both sides:

.. math::

    \mathrm{KL}_k(p \,\|\, s) = \sum_{i \in K} p_i \log \frac{p_i}{s_i} + m \log \frac{m}{1 - \sum_{i \in K} s_i}.

By the log-sum inequality it never exceeds the full KL, and the gap is the tail's own KL weighted by its mass:

.. math::

    0 \le \mathrm{KL}(p \,\|\, s) - \mathrm{KL}_k(p \,\|\, s) = m \, \mathrm{KL}(\hat p \,\|\, \hat s)
    \le m \log \frac{1}{\min_{j \notin K} \hat s_j},

with :math:`\hat p, \hat s` the two distributions renormalized over the classes outside :math:`K`. With
:math:`m = 0` (e.g. k = C) the two are equal. :func:`topk_kd_loss` multiplies by :math:`T^2` like
:func:`~lightning_distill.losses.functional.kd_loss`.

Masked classes (``-inf`` logits) follow :math:`0 \log 0 = 0` as in
:func:`~lightning_distill.losses.functional.kd_loss`: the student's log-probabilities and the teacher's stored ones
are floored at :math:`L = -10^4`, so a top-k class or a tail the teacher gives no mass (:math:`p_i = 0`,
:math:`m = 0`) contributes exactly 0, and one the student masks while the teacher gives it mass contributes
:math:`p_i (\log p_i - L)` (for the tail, :math:`m (\log m - \log \sum_{j \notin K} e^{\ell_{s,j}})`, the
student's tail at the floor): large but finite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_distill.losses.functional._chunked import chunked_row_sum
from lightning_distill.losses.functional._common import (
    check_chunk_size,
    check_mask,
    check_temperature,
    counted_positions,
)
from lightning_distill.losses.functional._topk_kl import topk_kl_sum
from lightning_distill.losses.functional.logits import cross_entropy, weigh_terms

__all__ = ["topk_distillation_terms", "topk_kd_loss", "topk_log_probs"]

if TYPE_CHECKING:
    from lightning_distill.teacher._runner import TopKTeacher


def topk_log_probs(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Encode logits ``(*, C)`` as ``(log-probabilities (*, k), class indices (*, k), tail mass (*))`` at ``T``.

    A masked (``-inf``) class has log-probability ``-inf`` here and no share of the tail; the loss floors it.

    Example::

        >>> values, indices, tail = topk_log_probs(torch.tensor([[0.0, 2.0, 1.0]]), k=2, temperature=1.0)
        >>> indices.tolist(), round(float(values.exp().sum() + tail), 6)
        ([[1, 2]], 1.0)
    """
    check_temperature(temperature)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"`k` must be an int in [1, {logits.shape[-1]}] (the number of classes), got {k!r}.")
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, indices = log_p.topk(k, dim=-1)
    if k == logits.shape[-1]:
        return values, indices, values.new_zeros(values.shape[:-1])
    # the mass outside the top-k summed directly, not as 1 - sum(top-k): exactly 0 when those classes are masked
    # (-inf), where a rounding leftover would meet a student's floored tail as a spurious 1e-7 * 1e4
    return values, indices, torch.logsumexp(log_p.scatter(-1, indices, float("-inf")), dim=-1).exp()


def topk_kd_loss(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    tail: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    target: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor:
    r"""``T² · mean_positions KL_k(p_t ‖ p_s)`` from a top-k teacher (see the module docstring for the bound).

    Args:
        student_logits: Student logits ``(*, C)``.
        values: The teacher's top-k log-probabilities at ``temperature``, ``(*, k)``.
        indices: Their class indices, ``(*, k)``.
        tail: The teacher's remaining probability mass, ``(*)``.
        temperature: The temperature the teacher was encoded at; the student is softened by the same one.
        mask: Optional bool ``(*)``: the positions that count.
        target: Optional class indices ``(*)``: positions equal to ``ignore_index`` do not count.
        ignore_index: See ``target``.
        chunk_size: Compute the loss this many positions at a time, so that the float32 softmax of only one chunk
            of ``(chunk_size, C)`` is alive (large vocabularies); the same value up to summation order.

    Raises:
        ValueError: For mismatched shapes or a bad temperature or ``chunk_size``.

    Example::

        >>> s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[2.0, 0.5, 0.0]])
        >>> v, i, m = topk_log_probs(t, k=3, temperature=2.0)  # k = C: exact
        >>> from lightning_distill.losses.functional import kd_loss
        >>> torch.allclose(topk_kd_loss(s, v, i, m, temperature=2.0), kd_loss(s, t, temperature=2.0))
        True
    """
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    lead = tuple(student_logits.shape[:-1])
    if tuple(values.shape[:-1]) != lead or values.shape != indices.shape or tuple(tail.shape) != lead:
        raise ValueError(
            f"Top-k teacher shapes do not match the student logits {tuple(student_logits.shape)}: values "
            f"{tuple(values.shape)}, indices {tuple(indices.shape)}, tail {tuple(tail.shape)}."
        )
    check_mask(mask, lead)
    keep = counted_positions(target, mask, ignore_index, student_logits.device)
    classes = student_logits.shape[-1]
    flat = student_logits.reshape(-1, classes)
    rows = flat.shape[0]
    values, indices, tail = values.reshape(rows, -1), indices.reshape(rows, -1), tail.reshape(-1)
    count = rows if keep is None else int(keep.sum())
    if count == 0:
        return student_logits.sum() * 0.0

    def row_sum(
        student: Tensor, top_values: Tensor, top_indices: Tensor, top_tail: Tensor, counted: Tensor | None
    ) -> Tensor:
        if counted is not None:  # the counted rows of this chunk only: no copy of the whole (N, C) logits
            student, top_values, top_indices, top_tail = (
                x[counted] for x in (student, top_values, top_indices, top_tail)
            )
        return topk_kl_sum(student, top_values, top_indices, top_tail, temperature)

    if chunk_size is None:
        total = row_sum(flat, values, indices, tail, keep)
    else:
        total = chunked_row_sum(row_sum, [flat, values, indices, tail, keep], chunk_size)
    return temperature**2 * total / count


def topk_distillation_terms(
    student_logits: Tensor,
    topk: TopKTeacher,
    target: Tensor | None,
    mask: Tensor | None,
    ignore_index: int,
    alpha: float,
    temperature: float,
    divergence: str,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """``{"loss", "task_loss", "kd_loss"}`` from a top-k teacher: ``alpha * topk_kd_loss + (1 - alpha) * CE``.

    A teacher from a token cache (``topk.positions`` set) must hold a distribution at every position the loss counts.

    Raises:
        ValueError: If ``temperature`` or ``divergence`` differ from what the top-k teacher was stored for
            (its temperature, ``"kl"``), the student has another vocabulary than the teacher, the loss counts a
            position the cache holds nothing for, or without a ``target`` while ``alpha < 1`` (see
            :func:`~lightning_distill.losses.functional.logits.weigh_terms`).
    """
    if temperature != topk.temperature or divergence != "kl":
        raise ValueError(
            f"The cached top-k teacher was stored at temperature {topk.temperature} for divergence 'kl'; the loss now "
            f"uses temperature {temperature} and divergence {divergence!r}. HINT: rebuild the cache, or cache the "
            "full logits."
        )
    classes = student_logits.shape[-1]
    if topk.num_classes is not None and topk.num_classes != classes:
        raise ValueError(
            f"The cached teacher has a vocabulary of {topk.num_classes} classes, the student's logits {classes}: "
            "distillation needs the same classes (the same tokenizer). HINT: give the student the teacher's "
            "vocabulary size."
        )
    if topk.positions is not None:
        kd = _token_rows_kd(student_logits, topk, target, mask, ignore_index, temperature, chunk_size)
    else:
        kd = topk_kd_loss(
            student_logits, topk.values, topk.indices, topk.tail, temperature, mask, target, ignore_index, chunk_size
        )
    task = None if target is None else cross_entropy(student_logits, target, mask=mask, ignore_index=ignore_index)
    return weigh_terms(kd, task, alpha)


def _token_rows_kd(
    student_logits: Tensor,
    topk: TopKTeacher,
    target: Tensor | None,
    mask: Tensor | None,
    ignore_index: int,
    temperature: float,
    chunk_size: int | None,
) -> Tensor:
    """The KD term from a token cache's rows: the student's logits taken at the stored positions.

    ``student_logits`` ``(B, L, V)`` are those the loss scores (after the next-token shift, whose position t is the
    unshifted t); every position the loss counts must have a stored row (one device synchronisation checks it, and
    that no row lies beyond the logits), and stored rows the loss does not count are left out.
    """
    assert topk.positions is not None
    if student_logits.ndim != 3:
        raise ValueError(
            f"A token cache's distributions need per-token logits (B, L, V), got {tuple(student_logits.shape)}."
        )
    batch, length, classes = student_logits.shape
    steps = topk.positions[:, 1]
    flat = topk.positions[:, 0] * length + steps.clamp(max=length - 1)  # each stored (row, position) is unique
    counted = counted_positions(target, mask, ignore_index, student_logits.device)
    furthest = steps.max() if len(steps) else steps.new_zeros(())
    if counted is None:  # every position counts: all B * L must be stored
        last, n_counted, n_covered = int(furthest), batch * length, len(flat)
    else:
        figures = torch.stack([furthest, counted.sum(), counted[flat].sum()]).tolist()  # one synchronisation
        last, n_counted, n_covered = (int(v) for v in figures)
    if last >= length:
        raise ValueError(
            f"The token cache holds distributions at position {last}, beyond the logits' {length}: the batch's "
            "sequences are shorter than in the pre-pass. HINT: pad on the right, each sequence at least as long as "
            "then."
        )
    if n_counted != n_covered:
        raise ValueError(
            f"The loss counts {n_counted - n_covered} positions of this batch for which the token cache holds no "
            "teacher distribution: the batch's attention mask or labels count other positions than in the pre-pass "
            "(which stores those with a real token and a label other than `ignore_index`, shifted with "
            "`shift_labels`). HINT: run the pre-pass with the module's `shift_labels` and `ignore_index` on the same "
            "data, or mask those positions in the batch."
        )
    rows, keep = student_logits.reshape(-1, classes)[flat], None if counted is None else counted[flat]
    return topk_kd_loss(rows, topk.values, topk.indices, topk.tail, temperature, keep, None, ignore_index, chunk_size)
