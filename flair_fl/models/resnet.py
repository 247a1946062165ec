"""ResNet18 for FLAIR (torchvision's architecture).

From scratch, every BatchNorm is replaced by GroupNorm(32), as in pfl-research's FLAIR
benchmark: GroupNorm keeps no running statistics, so nothing but trainable parameters
needs to be federated, and it is compatible with per-example DP-SGD.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18


def resnet18_groupnorm(num_classes: int, groups: int = 32) -> nn.Module:
    """torchvision ResNet18 with GroupNorm(`groups`) in place of every BatchNorm."""
    return resnet18(
        num_classes=num_classes, norm_layer=lambda channels: nn.GroupNorm(groups, channels)
    )
