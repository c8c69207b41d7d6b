"""Module twin of the feature-matching losses: it only stores and validates the hyper-parameters.

The math lives in :mod:`lightning_distill.losses.functional.features`.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_distill.losses.functional import FeatureLossName, check_feature_loss, feature_loss
from lightning_distill.losses.functional._common import check_power

__all__ = ["FeatureLoss"]


class FeatureLoss(nn.Module):
    """Feature-matching loss chosen by name; see :func:`~lightning_distill.losses.functional.feature_loss`.

    Args:
        loss: ``"mse"`` (default), ``"l1"``, ``"cosine"``, ``"kl"`` or ``"attention"`` (attention transfer, which
            allows different channel counts; weight it heavily, e.g. 1000).
        p: Exponent of the attention maps, a finite number ``> 0``; used only by ``"attention"``.

    Raises:
        ValueError: If ``loss`` is unknown or ``p`` is not finite and positive.

    Example::

        >>> import torch
        >>> loss_fn = FeatureLoss("cosine")
        >>> loss_fn
        FeatureLoss(loss='cosine')
        >>> s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> t = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> round(loss_fn(s, t).item(), 4)
        0.3764
        >>> FeatureLoss("attention", p=4)
        FeatureLoss(loss='attention', p=4.0)
    """

    def __init__(self, loss: FeatureLossName = "mse", p: float = 2.0) -> None:
        super().__init__()
        self.loss: FeatureLossName = check_feature_loss(loss)
        self.p = check_power(p)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        """Return the scalar loss between student and teacher features (over the ``mask``-ed positions, if given)."""
        return feature_loss(student, teacher, self.loss, p=self.p, mask=mask)

    def extra_repr(self) -> str:
        """Show the hyper-parameters in ``repr`` (``p`` only where it is used)."""
        return f"loss={self.loss!r}, p={self.p!r}" if self.loss == "attention" else f"loss={self.loss!r}"
