"""Independent reference formulas for the feature-matching losses.

Written from the definitions as plain Python loops over elements and positions in float64 (``math.sqrt``,
``math.exp``, ``math.log``); nothing here imports ``lightning_distill``. numpy is used only to walk indices.

- mse / l1: mean over every element of ``(s - t)**2`` / ``|s - t|``.
- cosine: mean over leading positions of ``1 - s.t / (max(|s|, eps) * max(|t|, eps))``, eps = 1e-8.
- kl: mean over leading positions of ``sum_d p_d (log p_d - log q_d)``, p = softmax(teacher), q = softmax(student).
- attention map (Zagoruyko & Komodakis 2017): per sample, ``Q_k = mean_c |F[c, k]|**p`` over the flattened
  spatial positions k, divided by ``max(||Q||_2, 1e-12)``; the loss is the mean over samples and positions of
  ``(Q_s - Q_t)**2``.

Every reference returns 0.0 for empty input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

COSINE_EPS = 1e-8
ATTENTION_EPS = 1e-12


def _leading_rows(x: np.ndarray) -> list[list[float]]:
    """The vectors along the last dimension, one list per leading position (row-major order)."""
    return [[float(v) for v in x[pos]] for pos in np.ndindex(*x.shape[:-1])]


def ref_mse(student: np.ndarray, teacher: np.ndarray) -> float:
    total, count = 0.0, 0
    for idx in np.ndindex(*student.shape):
        total += (float(student[idx]) - float(teacher[idx])) ** 2
        count += 1
    return total / count if count else 0.0


def ref_l1(student: np.ndarray, teacher: np.ndarray) -> float:
    total, count = 0.0, 0
    for idx in np.ndindex(*student.shape):
        total += abs(float(student[idx]) - float(teacher[idx]))
        count += 1
    return total / count if count else 0.0


def _norm(v: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def ref_cosine(student: np.ndarray, teacher: np.ndarray, eps: float = COSINE_EPS) -> float:
    if student.size == 0:
        return 0.0
    total, count = 0.0, 0
    for s, t in zip(_leading_rows(student), _leading_rows(teacher), strict=True):
        dot = sum(a * b for a, b in zip(s, t, strict=True))
        total += 1.0 - dot / (max(_norm(s), eps) * max(_norm(t), eps))
        count += 1
    return total / count


def _log_softmax(row: Sequence[float]) -> list[float]:
    top = max(row)
    log_norm = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_norm for v in row]


def ref_kl(student: np.ndarray, teacher: np.ndarray) -> float:
    """Mean over leading positions of KL(softmax(teacher) || softmax(student)) over the last dim."""
    if student.size == 0:
        return 0.0
    total, count = 0.0, 0
    for s, t in zip(_leading_rows(student), _leading_rows(teacher), strict=True):
        log_q, log_p = _log_softmax(s), _log_softmax(t)
        total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))
        count += 1
    return total / count


def ref_attention_map(feature: np.ndarray, p: float = 2.0) -> np.ndarray:
    """``(N, prod(spatial))`` float64 array of L2-normalized channel means of ``|F|**p``."""
    n, c = feature.shape[0], feature.shape[1]
    spatial = feature.shape[2:]
    size = int(np.prod(spatial)) if spatial else 1
    out = np.zeros((n, size), dtype=np.float64)
    for i in range(n):
        q = []
        for k in np.ndindex(*spatial):
            total = 0.0
            for ch in range(c):
                index = (i, ch, *k)
                total += abs(float(feature[index])) ** p
            q.append(total / c)
        norm = max(_norm(q), ATTENTION_EPS)
        for j, value in enumerate(q):
            out[i, j] = value / norm
    return out


def ref_attention_transfer(student: np.ndarray, teacher: np.ndarray, p: float = 2.0) -> float:
    q_s, q_t = ref_attention_map(student, p), ref_attention_map(teacher, p)
    total, count = 0.0, 0
    for i in range(q_s.shape[0]):
        for j in range(q_s.shape[1]):
            total += (q_s[i, j] - q_t[i, j]) ** 2
            count += 1
    return total / count if count else 0.0


REFERENCES = {
    "mse": ref_mse,
    "l1": ref_l1,
    "cosine": ref_cosine,
    "kl": ref_kl,
    "attention": ref_attention_transfer,
}
