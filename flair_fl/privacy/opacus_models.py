"""Which models DP-SGD can train, and the Opacus-ready copy of one that it trains.

Opacus computes per-example gradients with hooks on every trainable layer. Three things in
our models need care: BatchNorm in training mode (mixes examples: refused), in-place ops on
a hooked layer's output (torchvision's `out += identity`, `ReLU(inplace=True)`: PyTorch
forbids them under full backward hooks) and `FrozenBatchNorm2d` (a trainable layer with
buffers, which Opacus refuses although its statistics are constants).
"""

from __future__ import annotations

import copy

import torch
from opacus.grad_sample.utils import register_grad_sampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flair_fl.errors import ConfigError
from flair_fl.models.resnet import FrozenBatchNorm2d


def require_dp_sgd_compatible(model: nn.Module) -> None:
    """Raise ConfigError if per-example DP-SGD cannot train `model` privately.

    BatchNorm in training mode normalises each example with its batch's statistics, so one
    example's gradient depends on the others and per-example clipping bounds nothing.
    `FrozenBatchNorm2d` (pretrained ResNet18) always uses its running statistics and is
    fine. Opacus's validator only looks at layers with trainable parameters, so a
    BatchNorm with frozen parameters but live batch statistics would pass it; this check
    looks at every BatchNorm.
    """
    was_training = model.training
    model.train()
    try:
        batch_norms = [
            name or type(model).__name__
            for name, module in model.named_modules()
            if isinstance(module, _BatchNorm)
            and not isinstance(module, FrozenBatchNorm2d)
            and (module.training or any(p.requires_grad for p in module.parameters()))
        ]
        errors = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(was_training)
    if batch_norms:
        more = ", ..." if len(batch_norms) > 3 else ""
        raise ConfigError(
            f"privacy=dp_sgd: the model has BatchNorm layers in training mode "
            f"({', '.join(batch_norms[:3])}{more}); DP-SGD needs per-example gradients, "
            "which BatchNorm mixes across a batch. Use model.norm=group (smallcnn), "
            "model=resnet18 (GroupNorm, from scratch) or model=resnet18_pretrained "
            "(frozen BatchNorm)"
        )
    if errors:
        raise ConfigError(f"privacy=dp_sgd: Opacus cannot train this model: {errors[0]}")


class FrozenAffine2d(nn.Module):
    """A `FrozenBatchNorm2d` without buffers: y = (x * scale + shift) * weight + bias.

    `scale` and `shift` are plain tensors computed from the running statistics, so Opacus
    accepts the layer; `weight` and `bias` are the original layer's Parameters.
    """

    def __init__(self, norm: FrozenBatchNorm2d):
        super().__init__()
        mean, var, weight, bias = norm.running_mean, norm.running_var, norm.weight, norm.bias
        if mean is None or var is None or weight is None or bias is None:
            raise ValueError("FrozenBatchNorm2d needs running statistics and affine weights")
        inv_std = torch.rsqrt(var + norm.eps)
        self.scale, self.shift = inv_std.detach(), (-mean * inv_std).detach()
        self.weight, self.bias = weight, bias

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalised(x) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


@register_grad_sampler(FrozenAffine2d)
def _frozen_affine_grad_sample(
    layer: FrozenAffine2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients: each example's sum over pixels of (x_hat * dy) and of dy."""
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        x_hat = layer.normalised(activations[0])
        grads[layer.weight] = torch.einsum("nchw->nc", x_hat * backprops)
    if layer.bias.requires_grad:
        grads[layer.bias] = torch.einsum("nchw->nc", backprops)
    return grads


class _CopiedOutput(nn.Module):
    """Runs `layer` and returns a copy of its output, which later in-place ops may edit."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x)
        return out.clone()


def opacus_ready_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A training copy of `model` that Opacus can hook; same parameters in the same order.

    The copy keeps the resident model free of Opacus's hooks and per-sample buffers.
    `parameters()` of the copy and of `model` correspond one to one, in order.
    """
    private = copy.deepcopy(model).to(device).train()
    for module in private.modules():
        if getattr(module, "inplace", False):
            module.inplace = False  # type: ignore[assignment]
    swaps = [
        (parent, name, child)
        for parent in private.modules()
        for name, child in parent.named_children()
        if isinstance(child, FrozenBatchNorm2d)
        or any(p.requires_grad for p in child.parameters(recurse=False))
    ]
    for parent, name, child in swaps:
        layer = FrozenAffine2d(child) if isinstance(child, FrozenBatchNorm2d) else child
        setattr(parent, name, _CopiedOutput(layer))
    return private


def copy_parameters_back(private: nn.Module, model: nn.Module) -> None:
    """Write the trained copy's parameters into `model` (buffers are never trained)."""
    with torch.no_grad():
        for target, trained in zip(model.parameters(), private.parameters(), strict=True):
            target.copy_(trained)
