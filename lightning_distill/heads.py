"""Auxiliary exit heads for self-distillation: a small bottleneck and a classifier on an intermediate feature.

As in "Be Your Own Teacher" (Zhang et al., ICCV 2019), each shallow exit turns the backbone's feature at its depth
into (a) a *hint* feature shaped like the deepest feature, which an L2 loss pulls towards it, and (b) logits, which
learn from the labels and from the deepest exit's soft targets.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOLS: dict[int, Callable[..., Tensor]] = {
    1: F.adaptive_avg_pool1d,
    2: F.adaptive_avg_pool2d,
    3: F.adaptive_avg_pool3d,
}


class ExitHead(nn.Module):
    """Bottleneck + linear classifier on one intermediate feature.

    For a channel-first map ``(N, C, *spatial)`` (1 to 3 spatial dims) the bottleneck is a 3-wide convolution
    ``C -> width`` with ReLU; the hint is the bottleneck map average-pooled to the deepest feature's spatial size (or
    globally, when the deepest feature is a vector), and the classifier reads the globally averaged bottleneck. For
    a vector feature ``(N, D)`` the bottleneck is ``Linear(D, width)`` with ReLU, which is also the hint.

    Args:
        in_shape: Per-sample shape of the feature the head reads (no batch dimension): ``(C, *spatial)`` or ``(D,)``.
        width: Channels (or features) of the bottleneck; equal to the deepest feature's, so the hint matches it.
        num_classes: Number of logits.
        hint_shape: Per-sample shape of the deepest feature the hint is compared with; ``None`` for no hint.

    Raises:
        ValueError: For a feature of rank above 4 (more than 3 spatial dims) or a hint that cannot be shaped like
            the deepest feature (a map hint from a vector feature).

    Example::

        >>> import torch
        >>> head = ExitHead((16, 20), width=128, num_classes=10, hint_shape=(128,))
        >>> hint, logits = head(torch.randn(4, 16, 20))
        >>> tuple(hint.shape), tuple(logits.shape)
        ((4, 128), (4, 10))
    """

    def __init__(
        self, in_shape: tuple[int, ...], width: int, num_classes: int, hint_shape: tuple[int, ...] | None = None
    ) -> None:
        super().__init__()
        if not 1 <= len(in_shape) <= 4:
            raise ValueError(f"An exit head reads (C, *spatial) maps (1-3 spatial dims) or (D,) vectors: {in_shape}.")
        if hint_shape is not None and len(hint_shape) > 1 and len(in_shape) == 1:
            raise ValueError(f"A vector feature {in_shape} cannot give a hint shaped like the map {hint_shape}.")
        self.in_shape = tuple(in_shape)
        self.hint_shape = None if hint_shape is None else tuple(hint_shape)
        if len(in_shape) == 1:
            self.bottleneck: nn.Module = nn.Sequential(nn.Linear(in_shape[0], width), nn.ReLU())
        else:
            conv = _CONVS[len(in_shape) - 1](in_shape[0], width, kernel_size=3, padding=1)
            self.bottleneck = nn.Sequential(conv, nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(hint, logits)`` for a batch of features; ``hint`` is the bottleneck output, shaped for the L2."""
        hidden = self.bottleneck(feature)
        if hidden.ndim == 2:
            return hidden, self.classifier(hidden)
        pooled = hidden.flatten(2).mean(-1)
        if self.hint_shape is None or len(self.hint_shape) == 1:
            return pooled, self.classifier(pooled)
        size = self.hint_shape[1:]
        return _POOLS[len(size)](hidden, size), self.classifier(pooled)
