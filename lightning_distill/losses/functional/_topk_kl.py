r"""The top-k KL of :mod:`~lightning_distill.losses.functional.topk` as one autograd node, forward and backward fused.

With the student's :math:`\log s = \mathrm{log\_softmax}(z / T)` and :math:`s_{\mathrm{tail}} = \sum_{j \notin K} s_j`
(summed with the top-k entries zeroed: exact, no cancellation), both floored at :math:`L = -10^4` like every
divergence, the gradient with respect to :math:`z_j / T` of
:math:`\sum_{i \in K} p_i (\log p_i - \log s_i) + m (\log m - \log s_{\mathrm{tail}})` is

.. math::

    P \, s_j - p_j [j \in K] - m \, [j \notin K] \, s_j / s_{\mathrm{tail}}, \qquad P = \sum_{i \in K} p_i + m,

each term dropped where its log-probability sits at the floor (the floor passes no gradient; a tail with no mass
left is the bucket of its floored classes, :math:`L + \log(C - k)`). One softmax, its
exponential and one sum forward, one scaled copy backward: what the autograd graph of ``log_softmax``, ``gather``,
``scatter`` and ``logsumexp`` did in about three times the passes and nodes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_distill.losses.functional._common import LOG_ZERO


class _TopKKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, student: Tensor, values: Tensor, indices: Tensor, tail: Tensor, temperature: float) -> Tensor:
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        z = student if student.dtype == dtype else student.to(dtype)
        log_s = torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)
        s = log_s.exp()  # the student's probabilities
        s_top = s.gather(-1, indices)
        log_s_top = log_s.gather(-1, indices)
        head_live = log_s_top > LOG_ZERO  # a floored log-probability passes no gradient
        p = values.exp()
        loss = (p * (values - log_s_top.clamp(min=LOG_ZERO))).sum(-1)
        rest = m_live = torch.zeros_like(loss)  # the student's tail mass and the teacher's, where it has a gradient
        if indices.shape[-1] < student.shape[-1]:
            m, rest = tail.to(dtype), s.scatter_(-1, indices, 0.0).sum(-1)  # summed without cancellation
            tail_live = rest > 0
            # a tail whose every class is at the floor is the floored bucket: log(V - k) + L, as log-sum-exp gives it
            floored = LOG_ZERO + math.log(student.shape[-1] - indices.shape[-1])
            loss = loss + torch.xlogy(m, m) - m * torch.where(tail_live, rest.log(), floored)
            m_live = m * tail_live
        else:
            s.zero_()  # every class is a top-k one: their gradient is carried by s_top alone
        ctx.temperature, ctx.student_dtype = temperature, student.dtype
        ctx.save_for_backward(s, s_top, rest, p * head_live, m_live, indices)
        return loss.sum()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        s, s_top, rest, p_live, m_live, indices = ctx.saved_tensors
        weight = p_live.sum(-1) + m_live  # P over the live terms
        tail_weight = torch.where(rest > 0, m_live / rest.clamp(min=torch.finfo(rest.dtype).tiny), 0.0)
        grad = s * (weight - tail_weight).unsqueeze(-1)  # the classes outside the top-k (s is 0 on the top-k)
        grad.scatter_(-1, indices, s_top * weight.unsqueeze(-1) - p_live)
        grad.mul_(grad_output.to(grad.dtype) / ctx.temperature)
        return grad.to(ctx.student_dtype), None, None, None, None


def topk_kl_sum(student: Tensor, values: Tensor, indices: Tensor, tail: Tensor, temperature: float) -> Tensor:
    """The sum over ``(N, C)`` rows of ``KL_k`` (without T²), float32 (float64 for float64 logits); one node.

    ``values`` are the teacher's top-k log-probabilities (floored at ``LOG_ZERO`` here), ``indices`` their classes,
    ``tail`` the teacher's remaining mass. Gradients flow to ``student`` only.

    Example::

        >>> z = torch.randn(3, 5, requires_grad=True)
        >>> t = torch.log_softmax(torch.randn(3, 5), -1)
        >>> v, i = t.topk(2, -1)
        >>> m = 1 - v.exp().sum(-1)
        >>> topk_kl_sum(z, v, i, m, 1.0).backward()
        >>> bool(torch.allclose(z.grad.sum(-1), torch.zeros(3), atol=1e-6))  # a shift of the logits changes nothing
        True
    """
    return _TopKKL.apply(student, values.clamp(min=LOG_ZERO), indices.long(), tail, temperature)
