"""SCAFFOLD (Karimireddy et al. 2020, option II), server half (`strategy=scaffold`).

The server control variate travels with the weights under prefixed keys; each user's
control variate stays in a per-user store on disk, written by the clients (never in
Flower's per-node context). Clients correct every local gradient by (c - c_i) and reply
with their new weights and dc_i = c_i+ - c_i (option II: c_i+ = c_i - c + (x - y) /
(K * local_lr)); the round's mean of both comes back to `Scaffold.server_step`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from flair_fl.algorithms.fedopt import to_numpy, to_record

SCAFFOLD_C_PREFIX = "scaffold.c."  # server control variate, sent with the weights
SCAFFOLD_DC_PREFIX = "scaffold.dc."  # a client's control-variate change, in its reply


class Scaffold:
    """SCAFFOLD server: x <- x + lr * mean(y - x); c <- c + |S|/N * mean(dc)."""

    def __init__(
        self, population_size: int, lr: float = 1.0, weighted_by_key: str = "uniform-weight"
    ):
        self.population_size, self.lr, self.weight_key = population_size, lr, weighted_by_key
        self.control: dict[str, np.ndarray] | None = None
        self.current: dict[str, np.ndarray] | None = None

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
        """The weights plus the server control variate (prefixed keys); tells clients so."""
        self.current = to_numpy(arrays)
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in self.current.items()}
        payload = to_record(
            {**self.current, **{SCAFFOLD_C_PREFIX + k: v for k, v in self.control.items()}}
        )
        return payload, {**config, "scaffold": True}

    def server_step(self, server_round: int, mean: ArrayRecord, replies: int) -> ArrayRecord:
        """Move x towards the mean by lr and c by |S|/N times the mean control change."""
        assert self.current is not None and self.control is not None, "payload comes first"
        averaged = to_numpy(mean)
        share = replies / self.population_size
        for key in self.control:
            self.control[key] = self.control[key] + share * averaged[SCAFFOLD_DC_PREFIX + key]
        new = {k: x + self.lr * (averaged[k] - x) for k, x in self.current.items()}
        return to_record(new)

    def state_dict(self) -> dict[str, Any]:
        """The server control variate (the weights are the checkpoint's own)."""
        return {} if self.control is None else {"control": self.control}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "control" in state:
            self.control = {k: np.asarray(v) for k, v in state["control"].items()}
