"""Auxiliary exit heads for self-distillation: a small bottleneck and a classifier on an intermediate feature.

As in "Be Your Own Teacher" (Zhang et al., ICCV 2019), each shallow exit turns the backbone's feature at its depth
into (a) a *hint* feature shaped like the deepest feature, which an L2 loss pulls towards it, and (b) logits, which
learn from the labels and from the deepest exit's soft targets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_distill.features._projectors import ChannelProjector

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOLS: dict[int, Callable[..., Tensor]] = {
    1: F.adaptive_avg_pool1d,
    2: F.adaptive_avg_pool2d,
    3: F.adaptive_avg_pool3d,
}


class ExitHead(nn.Module):
    """A cheap bottleneck + linear classifier on one intermediate feature.

    For a channel-first map ``(N, C, *spatial)`` (1 to 3 spatial dims): a 3-wide convolution ``C -> C`` with ReLU
    (at the exit's own width, so a shallow head costs little), then a projection to ``width`` with ReLU: after global
    average pooling when the deepest feature is a vector (``Linear(C, width)``), or as a 1x1 convolution followed by
    average pooling to the deepest feature's spatial size when it is a map. That projection is the **hint** compared
    with the deepest feature; the classifier reads it (globally averaged, for a map). For a vector feature ``(N, D)``
    the bottleneck is ``Linear(D, width)`` with ReLU. For token features ``(N, L, D)`` (a transformer block's
    output, ``tokens=True``) the tokens are averaged and the bottleneck is ``Linear(D, width)`` with ReLU: the hint
    is then a vector.

    Args:
        in_shape: Per-sample shape of the feature the head reads (no batch dimension): ``(C, *spatial)`` or ``(D,)``.
        width: Width of the hint; equal to the deepest feature's channels (or features), so the hint matches it.
        num_classes: Number of logits.
        hint_shape: Per-sample shape of the deepest feature the hint is compared with; ``None`` for no hint.
        tokens: Read ``in_shape`` as ``(L, D)`` token features instead of a channel-first map.

    Raises:
        ValueError: For a feature of rank above 4 (more than 3 spatial dims), a hint that cannot be shaped like
            the deepest feature (a map hint from a vector or token feature), or ``tokens`` with another rank than 2.

    Example::

        >>> import torch
        >>> head = ExitHead((16, 20), width=128, num_classes=10, hint_shape=(128,))
        >>> hint, logits = head(torch.randn(4, 16, 20))
        >>> tuple(hint.shape), tuple(logits.shape)
        ((4, 128), (4, 10))
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        width: int,
        num_classes: int,
        hint_shape: tuple[int, ...] | None = None,
        tokens: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= len(in_shape) <= 4:
            raise ValueError(f"An exit head reads (C, *spatial) maps (1-3 spatial dims) or (D,) vectors: {in_shape}.")
        if tokens and len(in_shape) != 2:
            raise ValueError(f"Token features are (L, D) per sample, got {in_shape}.")
        if hint_shape is not None and len(hint_shape) > 1 and (len(in_shape) == 1 or tokens):
            raise ValueError(
                f"A vector or token feature {in_shape} cannot give a hint shaped like the map {hint_shape}."
            )
        self.in_shape = tuple(in_shape)
        self.width = width
        self.tokens = tokens
        self.hint_shape = None if hint_shape is None else tuple(hint_shape)
        channels = in_shape[-1] if tokens else in_shape[0]
        self.map_hint = self.hint_shape is not None and len(self.hint_shape) > 1
        if len(in_shape) == 1 or tokens:
            self.conv: nn.Module = nn.Identity()
        else:
            conv = _CONVS[len(in_shape) - 1](channels, channels, kernel_size=3, padding=1)
            self.conv = nn.Sequential(conv, nn.ReLU())
        self.project: nn.Module = ChannelProjector(channels, width) if self.map_hint else nn.Linear(channels, width)
        self.classifier = nn.Linear(width, num_classes)

    def spec(self) -> dict[str, Any]:
        """The constructor arguments other than ``num_classes``, as plain lists (stored in checkpoints)."""
        return {
            "in_shape": list(self.in_shape),
            "width": self.width,
            "hint_shape": None if self.hint_shape is None else list(self.hint_shape),
            "tokens": self.tokens,
        }

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(hint, logits)`` for a batch of features; ``hint`` is shaped like the deepest feature."""
        hidden = self.conv(feature)
        if not self.map_hint:
            pooled = hidden.mean(1) if self.tokens else hidden if hidden.ndim == 2 else hidden.flatten(2).mean(-1)
            hint = torch.relu(self.project(pooled))
            return hint, self.classifier(hint)
        assert self.hint_shape is not None  # map_hint implies it
        size = self.hint_shape[1:]
        hint = _POOLS[len(size)](torch.relu(self.project(hidden)), size)
        return hint, self.classifier(hint.flatten(2).mean(-1))
