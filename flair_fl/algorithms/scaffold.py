"""SCAFFOLD (Karimireddy et al. 2020, option II), both halves (`strategy=scaffold`).

The server control variate c travels with the global weights under prefixed keys; each
user's control variate c_i stays in a per-user store on disk, written by the clients (never
in Flower's per-node context).

- Client half (`ScaffoldClient`, federated/client_app.py runs it): correct every local
  gradient by (c - c_i), c_i from the store (zero the first time); reply with the new
  weights y and dc_i = c_i+ - c_i, where c_i+ = c_i - c + (x - y) / (K * local_lr) replaces
  c_i in the store.
- Server half (`Scaffold`): the round's mean of both comes back to `Scaffold.server_step`:
  x <- x + lr * mean(y - x); c <- c + |S|/N * mean(dc).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord

from flair_fl.algorithms.fedopt import to_numpy, to_record

SCAFFOLD_C_PREFIX = "scaffold.c."  # server control variate, sent with the weights
SCAFFOLD_DC_PREFIX = "scaffold.dc."  # a client's control-variate change, in its reply
State = dict[str, torch.Tensor]


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


class ControlStore(Protocol):
    """Where each user's control variate is kept (federated.user_state.UserStateStore)."""

    def load(self, user_id: str) -> State | None: ...

    def save(self, user_id: str, state: State) -> None: ...


def split_control(arrays: State) -> tuple[State, State]:
    """Separate model weights from SCAFFOLD's server control variate (prefixed keys)."""
    weights = {k: v for k, v in arrays.items() if not k.startswith(SCAFFOLD_C_PREFIX)}
    control = {
        k[len(SCAFFOLD_C_PREFIX) :]: v for k, v in arrays.items() if k.startswith(SCAFFOLD_C_PREFIX)
    }
    return weights, control


def scaffold_update(
    control: State, user_control: State, before: State, after: State, steps: int, lr: float
) -> tuple[State, State]:
    """Option II: c_i+ = c_i - c + (x - y) / (K lr). Returns (c_i+, dc_i with reply keys)."""
    new = {k: user_control[k] - control[k] + (before[k] - after[k]) / (steps * lr) for k in control}
    delta = {SCAFFOLD_DC_PREFIX + k: new[k] - user_control[k] for k in control}
    return new, delta


class ScaffoldClient:
    """One user's SCAFFOLD step: the gradient correction, then the control-variate update."""

    def __init__(self, store: ControlStore, user_id: str, control: State, before: State):
        """`control`: the server's c; `before`: the global weights x the user starts from."""
        self.store, self.user_id, self.control, self.before = store, user_id, control, before
        self.user_control = store.load(user_id) or {
            k: torch.zeros_like(v) for k, v in control.items()
        }

    def correction(self) -> State:
        """c - c_i, added to every local gradient (by parameter name)."""
        return {k: self.control[k] - self.user_control[k] for k in self.control}

    def finish(self, after: State, steps: int, lr: float) -> State:
        """Store c_i+ for the user; return dc_i under its reply keys."""
        new_control, delta = scaffold_update(
            self.control, self.user_control, self.before, after, steps, lr
        )
        self.store.save(self.user_id, new_control)
        return delta
