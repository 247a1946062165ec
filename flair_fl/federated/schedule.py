"""Server learning-rate schedules, for any strategy that has a server learning rate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import FedAvgM
from flwr.serverapp.strategy.fedopt import FedOpt

from flair_fl.federated.strategies import Scaffold, ServerOptimizer

KINDS = ("constant", "warmup_decay")


@dataclass(frozen=True)
class ServerLRSchedule:
    """lr(r) = peak * factor(r).

    `warmup_decay` (pfl-research's FLAIR setting): linear warm-up from peak/W at round 1 to
    the peak at round W = warmup_rounds, then linear decay to peak * final_factor at the
    last round.
    """

    num_rounds: int
    kind: str = "constant"
    warmup_rounds: int = 0
    final_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"server_lr_schedule.kind={self.kind!r}: expected one of {KINDS}")
        if self.warmup_rounds < 0:
            raise ValueError(f"server_lr_schedule.warmup_rounds={self.warmup_rounds}: must be >= 0")
        if not 0 <= self.final_factor <= 1:
            raise ValueError(
                f"server_lr_schedule.final_factor={self.final_factor}: must be in [0, 1]"
            )

    def factor(self, server_round: int) -> float:
        if self.kind == "constant":
            return 1.0
        warmup = self.warmup_rounds
        if server_round <= warmup:
            return server_round / warmup
        span = max(1, self.num_rounds - warmup)
        progress = min(1.0, (server_round - warmup) / span)
        return 1.0 - (1.0 - self.final_factor) * progress


def _lr_attribute(strategy: Any) -> str | None:
    if isinstance(strategy, ServerOptimizer | Scaffold):
        return "lr"
    if isinstance(strategy, FedOpt):
        return "eta"
    if isinstance(strategy, FedAvgM):
        return "server_learning_rate"
    return None


class ScheduledServerLR:
    """Sets the strategy's server learning rate before each round."""

    def __init__(self, strategy: Any, schedule: ServerLRSchedule):
        self.attribute = _lr_attribute(strategy)
        if self.attribute is None and schedule.kind != "constant":
            raise ValueError(
                f"server_lr_schedule.kind={schedule.kind!r}: {type(strategy).__name__} has no "
                "server learning rate (use fedavgm, fedadam, fedyogi, fedadagrad or scaffold)"
            )
        self.strategy, self.schedule = strategy, schedule
        self.peak = float(getattr(strategy, self.attribute)) if self.attribute else 1.0

    def lr(self, server_round: int) -> float:
        return self.peak * self.schedule.factor(server_round)

    def before_round(self, server_round: int) -> None:
        if self.attribute is None:
            return
        setattr(self.strategy, self.attribute, self.lr(server_round))
        if isinstance(self.strategy, FedAvgM):
            self.strategy.server_opt = True  # FedAvgM skips its update when lr == 1, mu == 0
