"""A torchvision-style residual CNN, written here because torchvision and timm cannot be imported on these machines.

It is built the way torchvision's and timm's ResNets are: ``ReLU(inplace=True)`` right after ``bn1``, a residual
``out += identity`` in every block, BatchNorm everywhere, a stem, ``layer1`` .. ``layerN`` stages and an ``fc`` head.
So a forward hook on ``bn1`` or ``layer1.0.bn2`` sees a tensor that the next operation changes in place.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv-bn-relu-conv-bn, ``out += identity``, relu (in place)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A small torchvision-style ResNet for ``(N, 3, H, W)`` images.

    Args:
        widths: Channels of each stage ``layer1`` .. ``layerN`` (one block each; stages after the first stride 2).
        num_classes: Size of the ``fc`` head.
    """

    def __init__(self, widths: tuple[int, ...] = (8, 16), num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels = widths[0]
        for index, width in enumerate(widths, start=1):
            self.add_module(f"layer{index}", nn.Sequential(BasicBlock(in_channels, width, 1 if index == 1 else 2)))
            in_channels = width
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def image_batch(n: int = 8, size: int = 8, num_classes: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random images ``(n, 3, size, size)`` and labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)
