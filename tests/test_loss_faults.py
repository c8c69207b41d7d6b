"""Bad inputs to the losses: each once passed silently or was refused only at the first step (issue 17, items 4, 7)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from lightning_distill import DistillModule
from lightning_distill.losses.functional import Divergence, distillation_loss_terms, kd_loss
from lightning_distill.losses.functional.topk import topk_kd_loss, topk_log_probs
from tests.helpers.tiny import tiny_student


def _logits(n: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, classes, generator=g), torch.randn(n, classes, generator=g)


@pytest.mark.parametrize("bad", [4, -1])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_kd_loss_refuses_a_target_outside_the_classes_chunked_or_not(bad, chunk_size):
    # the chunked path used the target only to select positions and let class 4 of 4 (or -1) through
    s, t = _logits()
    target = torch.tensor([0, 1, bad, 3, 0, 1])
    with pytest.raises(ValueError, match=rf"`target` holds class index {bad}, outside \[0, 4\) for 4 classes"):
        kd_loss(s, t, temperature=2.0, target=target, chunk_size=chunk_size)
    # ignored and masked-out positions are not classes and may hold anything
    ignored = torch.tensor([0, 1, -100, 3, 0, 1])
    mask = torch.tensor([True, True, False, True, True, True])
    for kwargs in ({"target": ignored}, {"target": target, "mask": mask}):
        chunked = kd_loss(s, t, temperature=2.0, chunk_size=chunk_size, **kwargs)
        torch.testing.assert_close(chunked, kd_loss(s[mask], t[mask], temperature=2.0))


@pytest.mark.parametrize(
    ("alpha", "temperature"),
    [(np.float32(0.25), np.float64(2.0)), (np.float64(0.25), np.int64(2)), (torch.tensor(0.25), torch.tensor(2.0))],
    ids=["numpy-float", "numpy-int", "0d-tensor"],
)
def test_numpy_and_0d_tensor_scalars_are_numbers_for_the_functional_losses(alpha, temperature):
    # DistillModule accepted them while the functional losses called them invalid
    s, t = _logits()
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    expected = distillation_loss_terms(s, t, target, alpha=0.25, temperature=2.0)
    got = distillation_loss_terms(s, t, target, alpha=alpha, temperature=temperature)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    torch.testing.assert_close(kd_loss(s, t, temperature=temperature), kd_loss(s, t, temperature=2.0))
    DistillModule(student=tiny_student(), alpha=alpha, temperature=temperature)


@pytest.mark.parametrize("bad", [True, np.bool_(True), torch.tensor([2.0]), torch.tensor(2.0 + 0j), "2.0"])
def test_what_is_not_one_real_number_is_still_refused(bad):
    s, t = _logits()
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0, got"):
        kd_loss(s, t, temperature=bad)


def test_dkd_with_chunking_is_refused_when_the_module_is_built():
    # it was refused only at the first training step, after the Trainer had set everything up
    with pytest.raises(ValueError, match=r"`kd_chunk_size=4` is not supported with divergence='dkd'"):
        DistillModule(student=tiny_student(), divergence="dkd", kd_chunk_size=4)


# -------------------------------------------- issue 17 item 4: -inf logits (masked classes) under every divergence
# The convention (0 log 0 = 0; log 0 on the side without the expectation counts as the floor L = -1e4) is checked
# against a float64 reference written here, one row at a time, from the definitions.
FLOOR = -1.0e4
INF = math.inf
DIVS: tuple[Divergence, ...] = ("kl", "reverse_kl", "soft_ce", "js", "mse", "dkd")
TEMPERATURE = 2.0


def _kl(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(p || q) of 1-d log-probabilities over the classes where p > 0 (0 log 0 = 0); inf where only q is 0."""
    has = lp > -INF
    return (lp[has].exp() * (lp[has] - lq[has])).sum()


def _ref_row(zs: Tensor, zt: Tensor, divergence: str, target: int, beta: float, floor: bool) -> Tensor:
    """The divergence of one row of float64 logits, from the definitions (mse: the documented floor).

    ``floor``: the documented value of an infinite divergence, log-probabilities of zero counted as ``FLOOR``.
    """
    if divergence == "mse":
        both = (zs == -INF) & (zt == -INF)
        return (zs[~both].clamp(min=FLOOR) - zt[~both].clamp(min=FLOOR)).square().mean()
    ls, lt = torch.log_softmax(zs / TEMPERATURE, -1), torch.log_softmax(zt / TEMPERATURE, -1)
    if floor:
        ls, lt = ls.clamp(min=FLOOR), lt.clamp(min=FLOOR)
    if divergence == "kl":
        return _kl(lt, ls)
    if divergence == "reverse_kl":
        return _kl(ls, lt)
    if divergence == "soft_ce":
        return -(lt[lt > -INF].exp() * ls[lt > -INF]).sum()
    if divergence == "js":
        cols = (ls > -INF) | (lt > -INF)
        ls, lt = ls[cols], lt[cols]
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
        return beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    others = torch.arange(zs.shape[0]) != target  # dkd: 1 * TCKD + 8 * NCKD

    def split(lp: Tensor) -> tuple[Tensor, Tensor]:
        rest = torch.logsumexp(lp[others], 0)
        return torch.stack([lp[target], rest]), lp[others] - rest

    (bs, hs), (bt, ht) = split(ls), split(lt)
    nckd = _kl(ht, hs) if bt[1] > -INF else zs.new_zeros(())  # a teacher without non-target mass has no p_hat
    return _kl(bt, bs) + 8.0 * nckd


def _reference(
    s: Tensor,
    t: Tensor,
    divergence: str,
    target: Tensor | None = None,
    beta: float = 0.5,
    keep: Tensor | None = None,
    floor: bool = False,
) -> Tensor:
    """T² (not for mse) times the mean over rows of :func:`_ref_row`; ``keep`` (N, C): the columns each row keeps."""
    rows = []
    for i in range(s.shape[0]):
        cols = torch.ones(s.shape[1], dtype=torch.bool) if keep is None else keep[i]
        y = -1 if target is None else int(cols[: int(target[i])].sum())  # the target's index among the kept
        rows.append(_ref_row(s[i][cols], t[i][cols], divergence, y, beta, floor))
    return torch.stack(rows).mean() * (1.0 if divergence == "mse" else TEMPERATURE**2)


def _masked_pair(masks: dict[str, Tensor], dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Random (6, 7) logits, -inf where ``masks["student"]`` / ``masks["teacher"]`` say, and targets never masked."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 7, generator=g, dtype=torch.float64) * 2, torch.randn(6, 7, generator=g, dtype=torch.float64)
    s = s.masked_fill(masks.get("student", torch.zeros_like(s, dtype=torch.bool)), -INF)
    t = t.masked_fill(masks.get("teacher", torch.zeros_like(t, dtype=torch.bool)), -INF)
    return s.to(dtype), t.to(dtype), torch.tensor([0, 1, 6, 3, 0, 6])


def _row_masks() -> Tensor:
    """Columns 2 and 5 masked on every row (a padded vocabulary) and one more that changes per row (a constraint)."""
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[:, [2, 5]] = True
    mask[torch.arange(6), torch.tensor([4, 3, 1, 4, 1, 3])] = True
    return mask


def _loss_and_grads(
    s: Tensor, t: Tensor, divergence: Divergence, target: Tensor, chunk_size: int | None = None, beta: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    kwargs = {"target": target} if divergence == "dkd" else {"chunk_size": chunk_size}
    loss = kd_loss(s, t, temperature=TEMPERATURE, divergence=divergence, js_beta=beta, **kwargs)
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    return loss, grad_s, grad_t


def _reference_and_grads(
    s: Tensor,
    t: Tensor,
    divergence: str,
    target: Tensor | None,
    beta: float = 0.5,
    keep: Tensor | None = None,
    floor: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    s, t = s.double().requires_grad_(True), t.double().requires_grad_(True)
    loss = _reference(s, t, divergence, target if divergence == "dkd" else None, beta, keep, floor)
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    return loss, grad_s, grad_t


def _cases() -> list[Any]:
    cases = [pytest.param(d, None, 0.5, id=d) for d in DIVS]
    cases.append(pytest.param("js", None, 0.2, id="js-beta0.2"))
    cases += [pytest.param(d, 2, 0.5, id=f"{d}-chunked") for d in DIVS if d != "dkd"]
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("divergence", "chunk_size", "beta"), _cases())
def test_classes_masked_by_both_models_drop_out_of_every_divergence(
    divergence: Divergence, chunk_size: int | None, beta: float, dtype: torch.dtype
) -> None:
    # mse was NaN (-inf - -inf); the others were right already (their finfo.min clamp), kept that way here
    mask = _row_masks()
    s, t, target = _masked_pair({"student": mask, "teacher": mask}, dtype)
    loss, grad_s, grad_t = _loss_and_grads(s, t, divergence, target, chunk_size, beta)
    ref, ref_s, ref_t = _reference_and_grads(s, t, divergence, target, beta, keep=~mask)  # the columns dropped
    tol: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(loss.double(), ref, **tol)
    for grad, expected in ((grad_s, ref_s), (grad_t, ref_t)):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[mask], torch.zeros_like(grad[mask]))
        torch.testing.assert_close(grad.double()[~mask], expected[~mask], **tol)


# (divergence, side that masks, whether the masked class vanishes from the expectation)
ONE_SIDED = [
    ("kl", "teacher", True),
    ("kl", "student", False),
    ("reverse_kl", "student", True),
    ("reverse_kl", "teacher", False),
    ("soft_ce", "teacher", True),
    ("soft_ce", "student", False),
    ("js", "teacher", True),  # JS is finite either way: the mixture has mass wherever one side has
    ("js", "student", True),
    ("dkd", "teacher", True),
    ("dkd", "student", False),
    ("mse", "teacher", False),
    ("mse", "student", False),
]


@pytest.mark.parametrize(
    ("divergence", "side", "vanishes", "chunk_size"),
    [
        pytest.param(d, side, v, c, id=f"{d}-{side}" + ("-chunked" if c else ""))
        for d, side, v in ONE_SIDED
        for c in ((None,) if d == "dkd" else (None, 2))
    ],
)
def test_a_class_masked_by_one_model_gives_a_finite_loss_with_finite_gradients(
    divergence: Divergence, side: str, vanishes: bool, chunk_size: int | None
) -> None:
    # the infinite cases: kl, reverse_kl and soft_ce gave ~1e38 (inf chunked: non-finite gradients), mse inf, dkd
    # inf; dkd's vanishing case had non-finite teacher gradients; the other vanishing cases were right already
    mask = _row_masks()
    s, t, target = _masked_pair({side: mask}, torch.float32)
    loss, grad_s, grad_t = _loss_and_grads(s, t, divergence, target, chunk_size)
    assert torch.isfinite(loss) and torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    assert ((grad_s if side == "student" else grad_t)[mask] == 0).all()  # a -inf logit gets no gradient
    if not vanishes and divergence != "mse":  # the true divergence is infinite; the loss is the documented floor
        assert _reference(s.double(), t.double(), divergence, target if divergence == "dkd" else None) == INF
    # vanishes: the zero-mass side's terms are exactly absent, the true (finite) divergence; else the floored one
    ref, ref_s, ref_t = _reference_and_grads(s, t, divergence, target, floor=not vanishes)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    atol = 1e-6 if vanishes else 1e-3  # float32 rounding of the 1e4-sized floored terms (cancelling in softmax)
    torch.testing.assert_close(grad_s.double(), ref_s, rtol=1e-5, atol=atol)
    torch.testing.assert_close(grad_t.double(), ref_t, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("side", ["teacher", "student", "both"])
def test_dkd_with_the_target_class_masked(side: str) -> None:
    # student: the loss was inf (b_s = [0, 1] against the teacher's p_y > 0); teacher, both: right already
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[torch.arange(6), torch.tensor([0, 1, 6, 3, 0, 6])] = True  # the targets of _masked_pair
    s, t, target = _masked_pair({"student": mask, "teacher": mask} if side == "both" else {side: mask}, torch.float32)
    loss, grad_s, grad_t = _loss_and_grads(s, t, "dkd", target)
    assert torch.isfinite(loss) and torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    ref, ref_s, ref_t = _reference_and_grads(s, t, "dkd", target, floor=side == "student")  # b_t = [0, 1]: drops
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_s.double(), ref_s, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad_t.double(), ref_t, rtol=1e-5, atol=1e-3)


def test_dkd_a_model_without_non_target_mass() -> None:
    # a teacher certain of the target (every other class masked) has no p_hat: its NCKD was KL(uniform || p_hat_s)
    s, t, target = _masked_pair({}, torch.float32)
    others = torch.ones(6, 7, dtype=torch.bool).scatter(1, target.unsqueeze(1), False)
    certain_t = t.masked_fill(others, -INF)
    s.requires_grad_(True)
    terms = distillation_loss_terms(s, certain_t, target, alpha=1.0, temperature=TEMPERATURE, divergence="dkd")
    assert terms["nckd_loss"].item() == 0.0
    expected = -torch.log_softmax(s / TEMPERATURE, -1).gather(1, target.unsqueeze(1)).mean() * TEMPERATURE**2
    torch.testing.assert_close(terms["tckd_loss"], expected)  # TCKD = -log p_s,y: b_t = [1, 0]
    grad, expected_grad = torch.autograd.grad(terms["loss"], s)[0], torch.autograd.grad(expected, s)[0]
    torch.testing.assert_close(grad, expected_grad)
    # a student certain of the target: its log p_hat is the floor for every class, a large finite NCKD
    terms = distillation_loss_terms(
        s.detach().masked_fill(others, -INF), t, target, alpha=1.0, temperature=TEMPERATURE, divergence="dkd"
    )
    log_hat_t = torch.log_softmax(t[others].reshape(6, 6).double() / TEMPERATURE, -1)
    nckd = (log_hat_t.exp() * (log_hat_t - FLOOR)).sum(-1).mean() * TEMPERATURE**2
    torch.testing.assert_close(terms["nckd_loss"].double(), nckd, rtol=1e-5, atol=1e-6)


def _topk_pair(masks: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    s, t, _ = _masked_pair({}, torch.float32)
    t = t.clone()
    t[:, [2, 5]] -= 6.0  # the two least likely teacher classes: outside a top-5
    none = torch.zeros_like(s, dtype=torch.bool)
    return s.masked_fill(masks.get("student", none), -INF), t.masked_fill(masks.get("teacher", none), -INF)


def _topk_loss(s: Tensor, t: Tensor, k: int) -> tuple[Tensor, Tensor]:
    s = s.clone().requires_grad_(True)
    loss = topk_kd_loss(s, *topk_log_probs(t, k, TEMPERATURE), temperature=TEMPERATURE)
    return loss, torch.autograd.grad(loss, s)[0]


@pytest.mark.parametrize("k", [7, 6, 5, 3])
def test_topk_kd_with_classes_masked_by_both(k: int) -> None:
    # k above the 5 unmasked classes: the -inf teacher values gave NaN
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[:, [2, 5]] = True
    loss, grad = _topk_loss(*_topk_pair({"student": mask, "teacher": mask}), k)
    s, t = _topk_pair({})
    kept_s, kept_t = s[:, ~mask[0]], t[:, ~mask[0]]
    if k >= 5:  # the top-k holds every unmasked class: the exact KL over them
        ref, ref_grad, _ = _reference_and_grads(kept_s, kept_t, "kl", None)
    else:  # the same top-k loss over the unmasked classes only
        ref, ref_grad = _topk_loss(kept_s, kept_t, k)
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad).all() and (grad[mask] == 0).all()
    torch.testing.assert_close(grad[:, ~mask[0]].double(), ref_grad.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_topk_kd_with_classes_masked_by_one_model(side: str) -> None:
    # teacher: NaN (the -inf values in the top-k); student: inf
    mask = _row_masks()
    s, t = _topk_pair({side: mask})
    loss, grad = _topk_loss(s, t, 7)  # k = C: the exact KL
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref, ref_grad, _ = _reference_and_grads(s, t, "kl", None, floor=side == "student")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_topk_kd_with_the_students_tail_masked_while_the_teacher_has_mass_there() -> None:
    # the bucket's log-mass was -inf and the term was dropped (0); it is the floored bucket, large but finite
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[:, [2, 5]] = True
    s, t = _topk_pair({"student": mask})
    values, indices, tail = topk_log_probs(t, 5, TEMPERATURE)
    assert set(indices[0].tolist()) == {0, 1, 3, 4, 6} and (tail > 0).all()
    loss = topk_kd_loss(s.requires_grad_(True), values, indices, tail, temperature=TEMPERATURE)
    assert torch.isfinite(torch.autograd.grad(loss, s)[0]).all()
    log_s = torch.log_softmax(s.detach().double() / TEMPERATURE, -1).gather(1, indices)
    head = (values.double().exp() * (values.double() - log_s)).sum(-1)
    bucket = tail.double() * (tail.double().log() - (FLOOR + math.log(2)))  # two classes at the floor
    torch.testing.assert_close(loss.double(), (head + bucket).mean() * TEMPERATURE**2, rtol=1e-5, atol=1e-6)


FAULTS = ["nan-student", "nan-teacher", "all-inf-student", "all-inf-teacher"]


def _faulty(fault: str) -> tuple[Tensor, Tensor, Tensor]:
    """Masked logits on both sides (and one side), with one NaN logit or one all -inf row."""
    mask = _row_masks()
    s, t, target = _masked_pair({"student": mask, "teacher": mask}, torch.float32)
    s[0, 3], t[4, 0] = -INF, -INF
    x = s if fault.endswith("student") else t
    if fault.startswith("nan"):
        x[1, 0] = math.nan
    else:
        x[2] = -INF
    return s, t, target


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize(("divergence", "chunk_size", "beta"), _cases())
def test_a_nan_or_an_all_inf_row_is_a_fault_not_a_mask(
    divergence: Divergence, chunk_size: int | None, beta: float, fault: str
) -> None:
    # the floor must not swallow them: NaN in, NaN out; an all -inf row is not finite (the finiteness check names it)
    s, t, target = _faulty(fault)
    loss = _loss_and_grads(s, t, divergence, target, chunk_size, beta)[0]
    assert torch.isnan(loss) if fault.startswith("nan") else not torch.isfinite(loss)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_nan_or_an_all_inf_row_is_a_fault_for_the_topk_loss(fault: str) -> None:
    s, t, _ = _faulty(fault)
    loss = _topk_loss(s, t, 3)[0]
    assert torch.isnan(loss) if fault.startswith("nan") else not torch.isfinite(loss)
