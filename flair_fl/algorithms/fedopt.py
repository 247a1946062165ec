"""FedOpt with a torch optimizer (`strategy=fedadam`): pfl-research's FLAIR server optimizer.

The round's mean of the clients' weights becomes a pseudo-gradient (global - mean) that a
torch optimizer applies. With `torch.optim.Adam` this is pfl-research's FLAIR server
optimizer exactly (bias correction from step 1, eps added to sqrt(v_hat)); Flower's FedAdam
uses step+1 in its bias correction and scales eps by it, which changes the effective step
size in the first hundreds of rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record as numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays as a record (copied to contiguous memory)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class ServerOptimizer:
    """FedOpt with a torch optimizer: x <- opt.step(grad = x - mean_k(y_k)).

    `optimizer` is a factory `params -> torch.optim.Optimizer` (e.g. a Hydra partial of
    torch.optim.Adam); `lr` is its learning rate (scheduled by `server_lr_schedule`).
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr: float = 1.0,
        weighted_by_key: str = "uniform-weight",
    ):
        self.optimizer_factory, self.lr, self.weight_key = optimizer, lr, weighted_by_key
        self.params: dict[str, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def server_lr(self) -> float | None:
        return self.lr

    @server_lr.setter
    def server_lr(self, value: float | None) -> None:
        assert value is not None
        self.lr = value

    def payload(
        self, server_round: int, arrays: ArrayRecord, config: dict[str, Any]
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """The weights as sent; the optimizer's parameters are set to them first."""
        current = to_numpy(arrays)
        if self.params is None or set(self.params) != set(current):
            self.params = {
                k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in current.items()
            }
            self.optimizer = self.optimizer_factory(list(self.params.values()), lr=self.lr)
        else:  # keep the optimizer state; take the weights as sent (e.g. after resume)
            with torch.no_grad():
                for k, v in current.items():
                    self.params[k].copy_(torch.from_numpy(v))
        return arrays, config

    def server_step(self, server_round: int, mean: ArrayRecord, replies: int) -> ArrayRecord:
        """One optimizer step on the pseudo-gradient (global - the round's mean)."""
        assert self.params is not None and self.optimizer is not None, "payload comes first"
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        for key, value in to_numpy(mean).items():
            param = self.params[key]
            param.grad = param.detach() - torch.from_numpy(value).to(param.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return to_record({k: p.detach().numpy().copy() for k, p in self.params.items()})

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's parameters and state (moments); empty before the first round."""
        if self.params is None or self.optimizer is None:
            return {}
        return {
            "server_optimizer": {
                "params": {k: p.detach().clone() for k, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(),
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (a checkpoint's "strategy" entry)."""
        saved = state.get("server_optimizer")
        if saved is None:
            return
        self.params = {k: torch.nn.Parameter(v.clone()) for k, v in saved["params"].items()}
        self.optimizer = self.optimizer_factory(list(self.params.values()), lr=self.lr)
        self.optimizer.load_state_dict(saved["optimizer"])
