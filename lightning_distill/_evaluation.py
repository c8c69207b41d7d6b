"""Validation and test metrics of a distilled student: its loss and accuracy, and beside the teacher's outputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_distill._batches import next_token_view
from lightning_distill.losses.functional import cross_entropy

if TYPE_CHECKING:
    from lightning_distill.module import DistillModule


def evaluate_student(
    module: DistillModule, stage: str, inputs: Any, target: torch.Tensor | None, dataloader_idx: int
) -> None:
    """Log ``{stage}/loss`` and ``{stage}/acc``; with teacher outputs also ``teacher_acc``, ``agreement``, ``kd_loss``.

    Positions count as in training (:meth:`DistillModule.position_mask <lightning_distill.DistillModule.position_mask>`
    and ``ignore_index``); rates are exact over the epoch and synchronized across processes.
    """
    logits = module.student_logits(inputs)
    batch_size = logits.shape[0]
    mask = module.position_mask(module.token_masks(inputs, target), logits)
    teacher = module.teacher_outputs
    teacher_logits = None if teacher is None else teacher.logits
    if module.shift_labels:
        logits, target, mask = next_token_view(logits, target, mask)
        teacher_logits = None if teacher_logits is None else next_token_view(teacher_logits, None, None)[0]
    preds = logits.argmax(-1)
    counted = torch.ones_like(preds, dtype=torch.bool) if mask is None else mask
    if target is not None:
        counted = counted & (target != module.ignore_index)
        loss = cross_entropy(logits, target, mask=mask, ignore_index=module.ignore_index)
        module.log(f"{stage}/loss", loss, batch_size=batch_size, sync_dist=True, prog_bar=stage == "val")
        module._log_rate(stage, dataloader_idx, "acc", preds == target, counted, prog_bar=stage == "val")
    if teacher_logits is None:
        return
    teacher_preds = teacher_logits.argmax(-1)
    module._log_rate(stage, dataloader_idx, "agreement", preds == teacher_preds, counted)
    if target is not None:
        module._log_rate(stage, dataloader_idx, "teacher_acc", teacher_preds == target, counted)
    if module.divergence == "dkd" and target is None:
        return  # DKD needs labels
    divergence = module.objective.kd_loss(logits, teacher_logits, target, counted, module.hparam_values())
    module.log(f"{stage}/kd_loss", divergence, batch_size=batch_size, sync_dist=True)
