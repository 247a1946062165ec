"""Which tensors are federated: trainable parameters only, never buffers."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def trainable_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Detached CPU copies of the parameters that require gradients, by name.

    Buffers (BatchNorm running statistics, num_batches_tracked) and frozen parameters are
    excluded: they never travel, are never aggregated and never see a server optimizer.
    """
    return OrderedDict(
        (name, p.detach().to("cpu", copy=True))
        for name, p in model.named_parameters()
        if p.requires_grad
    )


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's trainable parameters; the key sets must match."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(
            f"trainable parameters do not match: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
