"""Independent reference for decoupled knowledge distillation, written like the official code.

Zhao et al. (2022), "Decoupled Knowledge Distillation", CVPR. The official implementation is mdistiller
(megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``); this file follows its ``dkd_loss`` op by op:
probabilities from ``F.softmax``, bool ``gt_mask`` / ``other_mask`` built with ``scatter_``, the binary
distribution ``[p_target, sum of the rest]`` by ``cat_mask``, the non-target distribution by pushing the target
logit down with ``logit - 1000 * gt_mask`` before the softmax, and ``F.kl_div(log, prob, reduction="sum") * T**2 / N``
(mdistiller writes ``size_average=False``, the deprecated spelling of ``reduction="sum"``).

It works on ``(N, C)`` rows only; tests select the counted rows of ``(B, L, V)`` inputs themselves. Nothing here
imports ``lightning_distill``. The two parts are returned separately so tests can check ``tckd_loss`` and
``nckd_loss``; the paper's loss is ``alpha * tckd + beta * nckd`` (:func:`dkd_reference`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _get_gt_mask(logits: Tensor, target: Tensor) -> Tensor:
    target = target.reshape(-1)
    return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()


def _get_other_mask(logits: Tensor, target: Tensor) -> Tensor:
    target = target.reshape(-1)
    return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()


def cat_mask(t: Tensor, mask1: Tensor, mask2: Tensor) -> Tensor:
    t1 = (t * mask1).sum(dim=1, keepdim=True)
    t2 = (t * mask2).sum(dim=1, keepdim=True)
    return torch.cat([t1, t2], dim=1)


def dkd_reference_terms(
    logits_student: Tensor, logits_teacher: Tensor, target: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """``(tckd_loss, nckd_loss)`` of mdistiller's ``dkd_loss``, before its ``alpha`` / ``beta`` weights."""
    target = target.long()
    gt_mask = _get_gt_mask(logits_student, target)
    other_mask = _get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * (temperature**2) / target.shape[0]
    )
    return tckd_loss, nckd_loss


def dkd_reference(
    logits_student: Tensor,
    logits_teacher: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """mdistiller's ``dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature)``."""
    tckd_loss, nckd_loss = dkd_reference_terms(logits_student, logits_teacher, target, temperature)
    return alpha * tckd_loss + beta * nckd_loss
