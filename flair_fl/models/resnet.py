"""ResNet18 for FLAIR (torchvision's architecture), the two FLAIR benchmark variants.

- From scratch (FL-R / C-R): every BatchNorm replaced by GroupNorm(32), as in pfl-research:
  no running statistics, so only trainable parameters exist, and per-example DP-SGD works.
- Pretrained (FL-F / C-F): ImageNet weights with BatchNorm frozen as in pfl-research: the
  running statistics are used in training and evaluation alike and never updated (they are
  buffers, so they are never federated either); the affine weight and bias stay trainable.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from flair_fl.artifacts.safe_load import load_state_dict_file
from flair_fl.errors import ConfigError

HOW_TO_GET_WEIGHTS = (
    "On a machine with internet access run\n"
    '  python -c "import torch, torchvision; torch.save(torchvision.models.resnet18('
    "weights='IMAGENET1K_V1').state_dict(), 'resnet18.pth')\"\n"
    "copy resnet18.pth here and pass model.pretrained=/path/to/resnet18.pth"
)


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose running statistics are always used and never updated.

    Same parameters, buffers and state-dict keys as nn.BatchNorm2d, so torchvision
    checkpoints load unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=False,
            momentum=0.0,
            eps=self.eps,
        )


def resnet18_groupnorm(num_classes: int, groups: int = 32) -> nn.Module:
    """torchvision ResNet18 with GroupNorm(`groups`) in place of every BatchNorm."""
    return resnet18(
        num_classes=num_classes, norm_layer=lambda channels: nn.GroupNorm(groups, channels)
    )


def _load_weights(pretrained: str) -> dict[str, torch.Tensor]:
    path = Path(pretrained).expanduser()
    if path.is_file():  # data only: a pickled object (a whole model, a payload) is refused
        try:
            return load_state_dict_file(path, "model.pretrained file")
        except ConfigError as err:
            raise ValueError(str(err)) from None
    if pretrained.upper() in ("IMAGENET", "IMAGENET1K_V1", "DEFAULT"):
        try:  # weights_only and the hash in the file name checked, whatever torch's default
            weights = ResNet18_Weights.IMAGENET1K_V1
            return dict(weights.get_state_dict(progress=False, weights_only=True, check_hash=True))
        except Exception as err:  # offline: urllib / SSL / OS errors
            raise FileNotFoundError(
                f"model.pretrained={pretrained}: could not download torchvision's "
                f"IMAGENET1K_V1 weights ({type(err).__name__}: {err}).\n{HOW_TO_GET_WEIGHTS}"
            ) from None
    raise FileNotFoundError(
        f"model.pretrained={pretrained}: no such file (and not 'imagenet').\n{HOW_TO_GET_WEIGHTS}"
    )


def resnet18_pretrained(num_classes: int, pretrained: str = "imagenet") -> nn.Module:
    """ResNet18 with ImageNet weights (a torchvision state-dict file or the weight enum),
    BatchNorm frozen, and a new `num_classes` head."""
    model = resnet18(num_classes=1000, norm_layer=FrozenBatchNorm2d)
    state = _load_weights(pretrained)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit ResNet18's
        missing, unexpected = [str(err).splitlines()[-1].strip()], []
    if missing or unexpected:
        raise ValueError(
            f"model.pretrained={pretrained}: not a torchvision ResNet18 state dict "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model
