"""Independent reference formulas for the distillation losses.

Written from the definitions (DESIGN.md §3) as plain Python loops over positions and classes in float64 with
``math.exp`` / ``math.log``; nothing here imports or mirrors ``lightning_distill``. The two ``*_reference`` functions
at the end reproduce, with numpy, what two external libraries compute, so tests can show how our API maps to them:

- MNN ``_DistillLoss`` (alibaba/MNN ``tools/train/source/optimizer/Loss.cpp``, used by the demo
  ``tools/train/source/demo/distillTrainQuant.cpp`` with ``temperature=20, alpha=0.9``)::

      softTargets    = softmax(teacher / T);  studentPredict = softmax(student / T)
      loss1 = T*T * _KLDivergence(studentPredict, softTargets)
            = T*T * mean_b sum_c studentPredict * (log studentPredict - log softTargets)      # KL(p_s || p_t)
      loss2 = _CrossEntropy(softmax(student), oneHot) = -mean_b sum_c log(softmax(student)) * oneHot
      loss  = alpha * loss1 + (1 - alpha) * loss2

  -> ``distillation_loss(s, t, y, alpha=alpha, temperature=T, divergence="reverse_kl")`` exactly.

- Intel Neural Compressor ``PyTorchKnowledgeDistillationLoss`` (intel/neural-compressor
  ``neural_compressor/compression/distillation/criterions.py``), ``loss_types=["CE", "CE"]``,
  ``loss_weights=[w0, w1]`` (INC asserts ``w0 + w1 == 1``)::

      origin_loss       = torch.nn.CrossEntropyLoss()(student, target)          # mean, ignore_index=-100
      distillation_loss = SoftCrossEntropy(student / T, teacher / T) * T**2
                        = mean_b(-sum_c softmax(teacher / T) * log_softmax(student / T)) * T**2
      loss = origin_loss * w0 + distillation_loss * w1

  -> ``distillation_loss(s, t, y, alpha=w1, temperature=T, divergence="soft_ce")`` exactly (INC does multiply by
  T²; ``alpha = w1 = 1 - w0``). Two caveats: INC's KD term keeps positions whose target is -100 (only its CE
  drops them), ours drops them from both terms, so the two agree when no target is ignored; and INC's
  ``loss_types=["CE", "KL"]`` uses ``F.kl_div(log_p_s, p_t)`` with the default ``reduction="mean"`` (mean over
  batch *and* classes), i.e. our ``"kl"`` term divided by the number of classes C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------------------------------
# Plain-loop references (float64, math.exp / math.log)
# ----------------------------------------------------------------------------------------------------------------------


def _log_softmax(row: Sequence[float], temperature: float = 1.0) -> list[float]:
    scaled = [float(v) / temperature for v in row]
    top = max(scaled)
    if top == -math.inf:
        raise ValueError("all logits are -inf")
    total = 0.0
    for v in scaled:
        total += math.exp(v - top)
    log_norm = top + math.log(total)
    return [v - log_norm for v in scaled]


def _kl(log_p: Sequence[float], log_q: Sequence[float]) -> float:
    """KL(p || q) = sum p (log p - log q), with 0 * log 0 = 0."""
    out = 0.0
    for lp, lq in zip(log_p, log_q, strict=True):
        p = math.exp(lp)
        if p > 0.0:
            out += p * (lp - lq)
    return out


def ref_divergence(
    student_row: Sequence[float], teacher_row: Sequence[float], temperature: float, divergence: str
) -> float:
    """Per-position distillation loss (with the T² factor, none for "mse")."""
    if divergence == "mse":
        diffs = [(float(s) - float(t)) ** 2 for s, t in zip(student_row, teacher_row, strict=True)]
        return sum(diffs) / len(diffs)
    log_s = _log_softmax(student_row, temperature)
    log_t = _log_softmax(teacher_row, temperature)
    if divergence == "kl":
        value = _kl(log_t, log_s)
    elif divergence == "reverse_kl":
        value = _kl(log_s, log_t)
    elif divergence == "soft_ce":
        value = 0.0
        for lt, ls in zip(log_t, log_s, strict=True):
            p_t = math.exp(lt)
            if p_t > 0.0:
                value -= p_t * ls
    elif divergence == "js":
        log_m = []
        for lt, ls in zip(log_t, log_s, strict=True):
            m = 0.5 * (math.exp(lt) + math.exp(ls))
            log_m.append(math.log(m) if m > 0.0 else -math.inf)
        value = 0.5 * _kl(log_t, log_m) + 0.5 * _kl(log_s, log_m)
    else:
        raise ValueError(divergence)
    return temperature**2 * value


def _positions(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    return list(np.ndindex(*shape))


def _counts(pos: tuple[int, ...], mask: np.ndarray | None, target: np.ndarray | None, ignore_index: int) -> bool:
    if mask is not None and not bool(mask[pos]):
        return False
    return not (target is not None and int(target[pos]) == ignore_index)


def ref_kd_loss(
    student: np.ndarray,
    teacher: np.ndarray,
    temperature: float = 1.0,
    divergence: str = "kl",
    mask: np.ndarray | None = None,
    target: np.ndarray | None = None,
    ignore_index: int = -100,
) -> float:
    """Mean over counted positions of ``ref_divergence``; 0.0 when none counts."""
    total, count = 0.0, 0
    for pos in _positions(student.shape[:-1]):
        if not _counts(pos, mask, target, ignore_index):
            continue
        total += ref_divergence(list(student[pos]), list(teacher[pos]), temperature, divergence)
        count += 1
    return total / count if count else 0.0


def ref_cross_entropy(
    student: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, ignore_index: int = -100
) -> float:
    """Mean over counted positions of -log softmax(student)[target]; 0.0 when none counts."""
    total, count = 0.0, 0
    for pos in _positions(student.shape[:-1]):
        if not _counts(pos, mask, target, ignore_index):
            continue
        total -= _log_softmax(list(student[pos]))[int(target[pos])]
        count += 1
    return total / count if count else 0.0


def ref_distillation_loss(
    student: np.ndarray,
    teacher: np.ndarray,
    target: np.ndarray | None,
    alpha: float,
    temperature: float,
    divergence: str,
    mask: np.ndarray | None = None,
    ignore_index: int = -100,
) -> dict[str, float]:
    """``{"loss", "task_loss", "kd_loss"}`` with alpha weighting the KD term."""
    kd = ref_kd_loss(student, teacher, temperature, divergence, mask, target, ignore_index)
    task = 0.0 if target is None else ref_cross_entropy(student, target, mask, ignore_index)
    return {"loss": alpha * kd + (1.0 - alpha) * task, "task_loss": task, "kd_loss": kd}


# ----------------------------------------------------------------------------------------------------------------------
# External losses, reproduced op by op with numpy (float64)
# ----------------------------------------------------------------------------------------------------------------------


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def mnn_distill_loss_reference(
    student: np.ndarray, teacher: np.ndarray, one_hot: np.ndarray, temperature: float = 20.0, alpha: float = 0.9
) -> float:
    """MNN ``_DistillLoss(studentLogits, teacherLogits, oneHotTargets, temperature, alpha)`` on (B, C) inputs.

    MNN works in probability space: it takes ``log`` of softmax outputs (``_Log(predicts)``), as done here.
    """
    soft_targets = _np_softmax(teacher * (1.0 / temperature))
    student_predict = _np_softmax(student * (1.0 / temperature))
    # _KLDivergence(predicts, targets) = mean_b sum_c predicts * (log predicts - log targets)
    kl = np.mean(np.sum(student_predict * (np.log(student_predict) - np.log(soft_targets)), axis=1))
    loss1 = temperature * temperature * kl
    # _CrossEntropy(predicts, oneHot) = -mean_b sum_c log(predicts) * oneHot
    loss2 = -np.mean(np.sum(np.log(_np_softmax(student)) * one_hot, axis=1))
    return float(alpha * loss1 + (1.0 - alpha) * loss2)


def inc_kd_loss_reference(
    student: np.ndarray,
    teacher: np.ndarray,
    target: np.ndarray,
    temperature: float = 1.0,
    loss_weights: tuple[float, float] = (0.5, 0.5),
    loss_types: tuple[str, str] = ("CE", "CE"),
) -> float:
    """INC ``PyTorchKnowledgeDistillationLoss.loss_cal_sloss`` for (B, C) logits and integer targets.

    ``loss_types[0]`` must be "CE" (``torch.nn.CrossEntropyLoss()``: mean over non-ignored targets, -100 ignored);
    ``loss_types[1]`` is "CE" (``SoftCrossEntropy``) or "KL" (``F.kl_div`` with the default ``reduction="mean"``).
    """
    w0, w1 = loss_weights
    if loss_types[0] != "CE":
        raise ValueError(loss_types)
    counted = target != -100
    log_p = _np_log_softmax(student)
    origin_loss = -np.mean(log_p[counted, target[counted]]) if counted.any() else float("nan")

    student_out = student / temperature
    teacher_out = teacher / temperature
    log_prob = _np_log_softmax(student_out)
    targets_prob = _np_softmax(teacher_out)
    if loss_types[1] == "CE":
        distill = np.mean(np.sum(-targets_prob * log_prob, axis=-1))
    elif loss_types[1] == "KL":
        distill = np.mean(targets_prob * (np.log(targets_prob) - log_prob))  # mean over every element
    else:
        raise ValueError(loss_types)
    distill *= temperature**2

    origin_term = origin_loss if w0 > 0 else 0.0
    distill_term = distill if w1 > 0 else 0.0
    return float(origin_term * w0 + distill_term * w1)
