"""Module twins of the functional losses: they only store and validate the hyper-parameters.

The math lives in :mod:`lightning_distill.losses.functional`.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_distill.losses.functional import (
    Divergence,
    check_alpha,
    check_chunk_size,
    check_divergence,
    check_js_beta,
    check_temperature,
    check_weight,
    distillation_loss_terms,
    kd_loss,
)
from lightning_distill.losses.functional._common import check_ignore_index

__all__ = ["DistillationLoss", "KDLoss"]


def _dkd_repr(module: KDLoss | DistillationLoss) -> str:
    """``", tckd_weight=..., nckd_weight=..."`` for ``divergence="dkd"``, else ``""`` (other reprs unchanged)."""
    if module.divergence != "dkd":
        return ""
    return f", tckd_weight={module.tckd_weight!r}, nckd_weight={module.nckd_weight!r}"


class KDLoss(nn.Module):
    """Distillation loss between student and teacher logits; see :func:`~lightning_distill.losses.functional.kd_loss`.

    Args:
        temperature: Softmax temperature ``T > 0``; the loss carries the ``T²`` factor (except ``"mse"``).
        divergence: ``"kl"`` (Hinton et al., default), ``"reverse_kl"``, ``"soft_ce"``, ``"js"``, ``"mse"`` or
            ``"dkd"`` (decoupled KD; ``forward`` then needs ``target``).
        tckd_weight: Weight of DKD's target-class term, ``>= 0``; only used by ``"dkd"``.
        nckd_weight: Weight of DKD's non-target-class term, ``>= 0``; only used by ``"dkd"``.
        js_beta: The teacher's weight in ``"js"``'s mixture, in ``(0, 1)``; only used by ``"js"``.
        chunk_size: Compute the KD term over at most this many positions at a time (large vocabularies).

    Raises:
        ValueError: If ``temperature`` is not finite and positive, ``divergence`` is unknown or a DKD weight is
            negative or not finite.

    Example::

        >>> import torch
        >>> loss_fn = KDLoss(temperature=2.0)
        >>> loss_fn
        KDLoss(temperature=2.0, divergence='kl')
        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> round(loss_fn(s, t).item(), 4)
        0.2064
        >>> KDLoss(temperature=2.0, divergence="dkd")
        KDLoss(temperature=2.0, divergence='dkd', tckd_weight=1.0, nckd_weight=8.0)
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        divergence: Divergence = "kl",
        tckd_weight: float = 1.0,
        nckd_weight: float = 8.0,
        js_beta: float = 0.5,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        check_divergence(divergence)
        self.divergence: Divergence = divergence
        self.tckd_weight = check_weight("tckd_weight", tckd_weight)
        self.nckd_weight = check_weight("nckd_weight", nckd_weight)
        self.js_beta = check_js_beta(js_beta)
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, target: Tensor | None = None
    ) -> Tensor:
        """Return the loss averaged over the positions where ``mask`` (bool, leading dims) is true.

        ``target`` (class indices, leading dims) is required by ``"dkd"``; when given, positions whose target is
        ``-100`` do not count.
        """
        return kd_loss(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            divergence=self.divergence,
            mask=mask,
            target=target,
            tckd_weight=self.tckd_weight,
            nckd_weight=self.nckd_weight,
            js_beta=self.js_beta,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        """Show the hyper-parameters in ``repr`` (the DKD weights only for ``divergence="dkd"``)."""
        return f"temperature={self.temperature!r}, divergence={self.divergence!r}{_dkd_repr(self)}"


class DistillationLoss(nn.Module):
    """``alpha * KD + (1 - alpha) * CE``; see :func:`~lightning_distill.losses.functional.distillation_loss`.

    ``alpha`` weights the distillation term (MNN / Intel Neural Compressor / ModelOpt convention; torchdistill's
    ``alpha`` is ``1 - alpha`` here).

    Args:
        alpha: Weight of the distillation term, in ``[0, 1]``.
        temperature: Softmax temperature of the distillation term, ``> 0``.
        divergence: ``"kl"``, ``"reverse_kl"``, ``"soft_ce"``, ``"js"``, ``"mse"`` or ``"dkd"`` (needs targets).
        ignore_index: Target value whose positions are left out of both terms.
        tckd_weight: Weight of DKD's target-class term, ``>= 0``; only used by ``"dkd"``.
        nckd_weight: Weight of DKD's non-target-class term, ``>= 0``; only used by ``"dkd"``.
        js_beta: The teacher's weight in ``"js"``'s mixture, in ``(0, 1)``; only used by ``"js"``.
        chunk_size: Compute the KD term over at most this many positions at a time (large vocabularies).

    Raises:
        ValueError: If a hyper-parameter is out of range.

    Example::

        >>> import torch
        >>> loss_fn = DistillationLoss(alpha=0.9, temperature=2.0)
        >>> loss_fn
        DistillationLoss(alpha=0.9, temperature=2.0, divergence='kl', ignore_index=-100)
        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> round(loss_fn(s, t, torch.tensor([0, 2])).item(), 4)
        0.2671
        >>> {name: round(value.item(), 4) for name, value in loss_fn.terms(s, t, torch.tensor([0, 2])).items()}
        {'loss': 0.2671, 'task_loss': 0.8139, 'kd_loss': 0.2064}
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        temperature: float = 1.0,
        divergence: Divergence = "kl",
        ignore_index: int = -100,
        tckd_weight: float = 1.0,
        nckd_weight: float = 8.0,
        js_beta: float = 0.5,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.temperature = check_temperature(temperature)
        check_divergence(divergence)
        self.divergence: Divergence = divergence
        self.ignore_index = check_ignore_index(ignore_index)
        self.tckd_weight = check_weight("tckd_weight", tckd_weight)
        self.nckd_weight = check_weight("nckd_weight", nckd_weight)
        self.js_beta = check_js_beta(js_beta)
        self.chunk_size = check_chunk_size(chunk_size)

    def terms(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Return ``{"loss", "task_loss", "kd_loss"}`` (plus ``tckd_loss``, ``nckd_loss`` for ``"dkd"``).

        ``target=None`` needs ``alpha=1.0`` and a divergence other than ``"dkd"``.
        """
        return distillation_loss_terms(
            student_logits,
            teacher_logits,
            target,
            alpha=self.alpha,
            temperature=self.temperature,
            divergence=self.divergence,
            mask=mask,
            ignore_index=self.ignore_index,
            tckd_weight=self.tckd_weight,
            nckd_weight=self.nckd_weight,
            js_beta=self.js_beta,
            chunk_size=self.chunk_size,
        )

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Return the combined loss; ``target=None`` needs ``alpha=1.0``."""
        return self.terms(student_logits, teacher_logits, target, mask)["loss"]

    def extra_repr(self) -> str:
        """Show the hyper-parameters in ``repr``."""
        return (
            f"alpha={self.alpha!r}, temperature={self.temperature!r}, divergence={self.divergence!r}"
            f"{_dkd_repr(self)}, ignore_index={self.ignore_index!r}"
        )
