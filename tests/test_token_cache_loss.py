"""The loss from a token cache's rows: the student's logits at each stored position, and the fused top-k KL.

Each expectation is a float64 formula written here from the definition (the head classes, then the tail as one
bucket), or autograd through it for the gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_distill.losses.functional.topk import topk_distillation_terms, topk_kd_loss
from lightning_distill.teacher._runner import TopKTeacher

FLOOR = -1.0e4  # the documented log-probability of a zero probability (LOG_ZERO)


# ------------------------------------------------------------------------------------------ token rows in the loss
def _kl_k_reference(z: np.ndarray, values: np.ndarray, indices: np.ndarray, tail: float, t: float) -> float:
    """KL_k of one row, in float64, written from the definition (head classes, then the tail as one bucket)."""
    log_s = z / t - np.log(np.exp(z / t - (z / t).max()).sum()) - (z / t).max()
    outside = np.ones(len(z), dtype=bool)
    outside[indices] = False
    head = float((np.exp(values) * (values - log_s[indices])).sum())
    if not outside.any():
        return head
    log_s_tail = np.log(np.exp(log_s[outside]).sum())
    return head + (tail * np.log(tail) if tail > 0 else 0.0) - tail * log_s_tail


def test_token_rows_are_scored_at_their_positions() -> None:
    """The loss from a token cache's rows: the student's logits at each stored (row, position), counted ones only."""
    gen = torch.Generator().manual_seed(9)
    batch, length, vocab, k, t = 3, 6, 10, 4, 1.5
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, 4:] = -100
    stored = labels != -100
    stored[1, 2] = True  # stored but not counted by this batch's labels: left out
    labels[1, 2] = -100
    positions = stored.nonzero()
    n = len(positions)
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=gen) * 2, -1)
    values, indices = teacher.topk(k, -1)
    tail = (1 - values.exp().sum(-1)).clamp(min=0)
    rows = TopKTeacher(values, indices, tail, t, positions=positions, num_classes=vocab)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    terms = topk_distillation_terms(logits, rows, labels, None, -100, 1.0, t, "kl")
    expected = [
        _kl_k_reference(
            logits[b, p].detach().numpy(), values[i].double().numpy(), indices[i].numpy(), float(tail[i]), t
        )
        for i, (b, p) in enumerate(positions.tolist())
        if labels[b, p] != -100
    ]
    assert math.isclose(float(terms["kd_loss"]), t**2 * float(np.mean(expected)), rel_tol=1e-6)
    terms["loss"].backward()  # the fused KL's gradient against autograd through the float64 reference formula
    reference = torch.zeros(())
    for i, (b, p) in enumerate(positions.tolist()):
        if labels[b, p] != -100:
            log_s = torch.log_softmax(logits[b, p] / t, -1)
            outside = torch.ones(vocab, dtype=torch.bool)
            outside[indices[i]] = False
            head = (values[i].double().exp() * (values[i].double() - log_s[indices[i]])).sum()
            reference = reference + head - tail[i].double() * torch.logsumexp(log_s[outside], -1)
    (grad,) = torch.autograd.grad(t**2 * reference / len(expected), logits)
    torch.testing.assert_close(logits.grad, grad, rtol=1e-5, atol=1e-7)

    labels[0, 4] = 3  # counted now, but not stored
    with pytest.raises(ValueError, match="The loss counts 1 positions of this batch for which the token cache"):
        topk_distillation_terms(logits, rows, labels, None, -100, 1.0, t, "kl")
    with pytest.raises(ValueError, match="at position 5, beyond the logits' 5"):
        topk_distillation_terms(logits[:, :5], rows, labels[:, :5], None, -100, 1.0, t, "kl")
    with pytest.raises(ValueError, match=r"per-token logits \(B, L, V\)"):
        topk_distillation_terms(logits[:, 0], rows, labels[:, 0], None, -100, 1.0, t, "kl")


@pytest.mark.parametrize("k", [3, 8])
def test_the_fused_topk_kl_equals_autograd_with_masked_classes(k: int) -> None:
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    z[:, 2] = float("-inf")  # a class the student masks: finite loss and gradients, none for that class
    z.requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(6, 8, generator=gen, dtype=torch.float64), -1)
    values, indices = teacher.topk(k, -1)
    tail = (1 - values.exp().sum(-1)).clamp(min=0)
    loss = topk_kd_loss(z, values, indices, tail, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, z)
    log_s = torch.log_softmax(z / 2.0, -1).clamp(min=FLOOR)
    head = (values.exp() * (values - log_s.gather(-1, indices))).sum(-1)
    if k < 8:
        log_s_tail = torch.logsumexp(log_s.scatter(-1, indices, float("-inf")), -1).clamp(min=FLOOR)
        head = head + torch.xlogy(tail, tail) - tail * log_s_tail
    expected = 4.0 * head.mean()
    (expected_grad,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert torch.isfinite(grad).all() and (grad[:, 2] == 0).all()
    free = torch.randn(6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: topk_kd_loss(x, values, indices, tail, temperature=0.7), (free,))
