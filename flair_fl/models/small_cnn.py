"""A small CNN for fast runs on synthetic data (seconds per round on a CPU)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["group", "batch", "none"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class SmallCNN(nn.Module):
    """Three conv blocks (conv-norm-ReLU-pool) and a linear head producing logits.

    `norm="batch"` gives a model with buffers (running statistics), which the federated
    code must never aggregate.
    """

    def __init__(self, num_classes: int, width: int = 32, norm: Norm = "group"):
        super().__init__()
        if num_classes < 1 or width < 1:
            raise ValueError(f"num_classes and width must be >= 1, got {num_classes}, {width}")
        layers: list[nn.Module] = []
        channels = 3
        for multiplier in (1, 2, 4):
            out = width * multiplier
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=norm == "none"),
                _norm(norm, out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def small_cnn(num_classes: int, width: int = 32, norm: Norm = "group") -> SmallCNN:
    """Factory used by `model=smallcnn`."""
    return SmallCNN(num_classes, width, norm)
