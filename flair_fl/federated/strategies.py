"""Server strategies that Flower lacks or that must match the FLAIR references exactly.

- `ServerOptimizer`: FedAvg's average turned into a pseudo-gradient (global - average) and
  applied with a torch optimizer. With `torch.optim.Adam` this is pfl-research's FLAIR server
  optimizer exactly (bias correction from step 1, eps added to sqrt(v_hat)); Flower's
  FedAdam uses step+1 in its bias correction and scales eps by it, which changes the
  effective step size in the first hundreds of rounds.
- `AdaFedProx`: Flower's FedProx whose mu `adaptive_mu.AdaptiveMu` sets between rounds.
- `Scaffold`: SCAFFOLD (Karimireddy et al. 2020, option II). The server control variate
  travels with the weights under prefixed keys; each user's control variate stays in a
  per-user store on disk, written by the clients (never in Flower's per-node context).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

SCAFFOLD_C_PREFIX = "scaffold.c."  # server control variate, sent with the weights
SCAFFOLD_DC_PREFIX = "scaffold.dc."  # a client's control-variate change, in its reply


def _to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class ServerOptimizer(FedAvg):
    """FedOpt with a torch optimizer: x <- opt.step(grad = x - mean_k(y_k)).

    `optimizer` is a factory `params -> torch.optim.Optimizer` (e.g. a Hydra partial of
    torch.optim.Adam); `lr` is its learning rate (scheduled by `server_lr_schedule`).
    """

    def __init__(
        self, optimizer: Callable[..., torch.optim.Optimizer], lr: float = 1.0, **fedavg_kwargs: Any
    ):
        super().__init__(**fedavg_kwargs)
        self.optimizer_factory, self.lr = optimizer, lr
        self.params: dict[str, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        current = _to_numpy(arrays)
        if self.params is None or set(self.params) != set(current):
            self.params = {
                k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in current.items()
            }
            self.optimizer = self.optimizer_factory(list(self.params.values()), lr=self.lr)
        else:  # keep the optimizer state; take the weights as sent (e.g. after resume)
            with torch.no_grad():
                for k, v in current.items():
                    self.params[k].copy_(torch.from_numpy(v))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        average, metrics = super().aggregate_train(server_round, replies)
        if average is None or self.params is None or self.optimizer is None:
            return average, metrics
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        for key, value in _to_numpy(average).items():
            param = self.params[key]
            param.grad = param.detach() - torch.from_numpy(value).to(param.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _to_record({k: p.detach().numpy().copy() for k, p in self.params.items()}), metrics


class AdaFedProx(FedProx):
    """FedProx for an adapted mu: starting at mu = 0 is meant here (pfl-research's FLAIR
    setting), so FedProx's "equivalent to FedAvg" warning for it is not given."""

    def __init__(self, proximal_mu: float = 0.0, **fedprox_kwargs: Any):
        super().__init__(proximal_mu=1.0, **fedprox_kwargs)  # FedProx warns only about 0
        self.proximal_mu = proximal_mu


class Scaffold(FedAvg):
    """SCAFFOLD server: x <- x + lr * mean(y - x); c <- c + |S|/N * mean(dc).

    Clients correct every local gradient by (c - c_i) and reply with their new weights and
    dc_i = c_i+ - c_i (option II: c_i+ = c_i - c + (x - y) / (K * local_lr)).
    """

    def __init__(self, population_size: int, lr: float = 1.0, **fedavg_kwargs: Any):
        super().__init__(**fedavg_kwargs)
        self.population_size, self.lr = population_size, lr
        self.control: dict[str, np.ndarray] | None = None
        self.current: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = _to_numpy(arrays)
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in self.current.items()}
        payload = _to_record(
            {**self.current, **{SCAFFOLD_C_PREFIX + k: v for k, v in self.control.items()}}
        )
        config["scaffold"] = True
        return super().configure_train(server_round, payload, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        average, metrics = super().aggregate_train(server_round, replies)
        if average is None or self.current is None or self.control is None:
            return average, metrics
        mean = _to_numpy(average)
        share = _num_replies(replies) / self.population_size
        for key in self.control:
            self.control[key] = self.control[key] + share * mean[SCAFFOLD_DC_PREFIX + key]
        new = {k: x + self.lr * (mean[k] - x) for k, x in self.current.items()}
        return _to_record(new), metrics


def _num_replies(replies: list[Message]) -> int:
    """Users behind the replies: a merged reply (federated/reduce.py) stands for several."""
    total = 0
    for reply in replies:
        if not reply.has_error():
            metrics = next(iter(reply.content.metric_records.values()))
            total += int(metrics.get("replies", 1))  # type: ignore[arg-type]
    return total
