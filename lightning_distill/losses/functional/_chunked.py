"""A sum over rows computed a chunk of rows at a time, gradients included: the memory-bounded KD losses' engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

RowSum = Callable[..., Tensor]
"""Computes the sum of a loss over one chunk: called with the chunk's slice of every row-aligned tensor."""


class _ChunkedRowSum(torch.autograd.Function):
    """``sum_chunks fn(*[t[chunk] for t in tensors])``, ``chunk_size`` rows at a time, gradients included.

    The forward pass takes each chunk through ``fn`` and ``torch.autograd.grad`` at once and writes the chunk's
    gradient into one preallocated tensor per input that needs it; the backward pass only scales those. So at most
    one chunk's float32 copies and softmaxes are alive, and no full-size temporary is made for a chunk's gradient
    (slicing a tensor inside the autograd graph would allocate one per chunk). The loss can be back-propagated once.
    """

    @staticmethod
    def forward(ctx: Any, fn: RowSum, chunk_size: int, *tensors: Tensor | None) -> Tensor:
        wants = [t is not None and ctx.needs_input_grad[i + 2] for i, t in enumerate(tensors)]
        grads = [
            torch.zeros_like(t) if t is not None and want else None for t, want in zip(tensors, wants, strict=True)
        ]
        first = next(t for t in tensors if t is not None)
        total = first.new_zeros((), dtype=torch.float64 if first.dtype == torch.float64 else torch.float32)
        for start in range(0, first.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            with torch.enable_grad():
                pieces = [
                    None if t is None else t[part].detach().requires_grad_(want)
                    for t, want in zip(tensors, wants, strict=True)
                ]
                value = fn(*pieces)
                needed = [p for p, want in zip(pieces, wants, strict=True) if p is not None and want]
                chunk_grads = iter(torch.autograd.grad(value, needed) if needed else ())
            for grad, want in zip(grads, wants, strict=True):
                if want:
                    grad[part] = next(chunk_grads)  # type: ignore[index]
            total = total + value.detach()
        ctx.grads = grads  # kept on ctx, not saved: backward scales them in place instead of copying them
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "The chunked KD loss was back-propagated twice; its gradients are computed once and handed over. "
                "HINT: recompute the loss, or use chunk_size=None with retain_graph=True."
            )
        grads, ctx.grads = ctx.grads, None
        return (None, None, *(None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads))


def chunked_row_sum(fn: RowSum, tensors: Sequence[Tensor | None], chunk_size: int) -> Tensor:
    """The sum of ``fn`` over chunks of ``chunk_size`` rows of the row-aligned ``tensors`` (``None`` passes through).

    Equals ``fn(*tensors)`` up to summation order when ``fn`` is a sum over rows; at most one chunk's intermediates
    are alive at a time.

    Example::

        >>> x = torch.randn(10, 3, requires_grad=True)
        >>> total = chunked_row_sum(lambda rows: (rows**2).sum(), [x], chunk_size=4)
        >>> total.backward()
        >>> torch.allclose(x.grad, 2 * x)
        True
    """
    return _ChunkedRowSum.apply(fn, chunk_size, *tensors)
