"""Server learning-rate schedules, for any strategy that has a server learning rate
(`server_lr` of the strategy contract, federated/contract.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flair_fl.federated.contract import ServerStrategy, strategy_name

log = logging.getLogger(__name__)
PFL_POLYNOMIAL = "polynomial_decay_with_warmup"
KINDS = ("constant", "warmup_decay", PFL_POLYNOMIAL)


@dataclass(frozen=True)
class ServerLRSchedule:
    """The server learning rate of round r (1-based) for a configured (peak) lr.

    - `constant`: the peak every round.
    - `warmup_decay` (flair-fl's own): linear warm-up from peak/W at round 1 to the peak at
      round W = warmup_rounds, then linear decay to peak * final_factor at the last round.
    - `polynomial_decay_with_warmup`: pfl-research's
      `get_polynomial_decay_schedule_with_warmup(optimizer, num_warmup_steps=W,
      num_training_steps=T, lr_end, power)` as pfl steps it (its scheduler steps after each
      server update, so round r uses step s = r - 1): s / W during warm-up (round 1: 0),
      then (peak - lr_end) * (1 - (s - W) / (T - W))^power + lr_end, and lr_end (an absolute
      lr, not a factor) for s > T.
    """

    num_rounds: int
    kind: str = "constant"
    warmup_rounds: int = 0
    final_factor: float = 1.0  # warmup_decay
    lr_end: float = 0.0  # polynomial_decay_with_warmup: absolute lr at step T and after
    training_steps: int | None = None  # polynomial_decay_with_warmup: T; None: num_rounds
    power: float = 1.0  # polynomial_decay_with_warmup

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"server_lr_schedule.kind={self.kind!r}: expected one of {KINDS}")
        if self.warmup_rounds < 0:
            raise ValueError(f"server_lr_schedule.warmup_rounds={self.warmup_rounds}: must be >= 0")
        if not 0 <= self.final_factor <= 1:
            raise ValueError(
                f"server_lr_schedule.final_factor={self.final_factor}: must be in [0, 1]"
            )
        if self.lr_end < 0:
            raise ValueError(f"server_lr_schedule.lr_end={self.lr_end}: must be >= 0")
        if self.power <= 0:
            raise ValueError(f"server_lr_schedule.power={self.power}: must be > 0")
        reaches_decay = self.num_rounds > self.warmup_rounds
        if self.kind == PFL_POLYNOMIAL and reaches_decay and self.decay_end <= self.warmup_rounds:
            raise ValueError(
                f"server_lr_schedule.training_steps={self.decay_end}: must be > "
                f"warmup_rounds={self.warmup_rounds} (the decay would have no steps)"
            )

    @property
    def decay_end(self) -> int:
        """T of the polynomial schedule (pfl's num_training_steps)."""
        return self.num_rounds if self.training_steps is None else self.training_steps

    @property
    def peak_round(self) -> int:
        """The first round that runs at the peak lr."""
        if self.kind == PFL_POLYNOMIAL:
            return self.warmup_rounds + 1
        return max(1, self.warmup_rounds)

    def check_peak(self, peak: float) -> None:
        """pfl-research refuses lr_end above the initial lr; so do we."""
        if self.kind == PFL_POLYNOMIAL and self.lr_end > peak:
            raise ValueError(
                f"server_lr_schedule.lr_end={self.lr_end}: must be <= the server lr {peak}"
            )

    def lr(self, server_round: int, peak: float) -> float:
        """The server lr of round `server_round` (1-based)."""
        if self.kind == "constant":
            return peak
        if self.kind == PFL_POLYNOMIAL:
            return self._polynomial(server_round - 1, peak)
        warmup = self.warmup_rounds
        if server_round <= warmup:
            return peak * server_round / warmup
        span = max(1, self.num_rounds - warmup)
        progress = min(1.0, (server_round - warmup) / span)
        return peak * (1.0 - (1.0 - self.final_factor) * progress)

    def _polynomial(self, step: int, peak: float) -> float:
        warmup, end = self.warmup_rounds, self.decay_end
        if step < warmup:
            return peak * step / max(1, warmup)
        if step > end:
            return self.lr_end
        remaining = 1 - (step - warmup) / (end - warmup)
        return (peak - self.lr_end) * remaining**self.power + self.lr_end


class ScheduledServerLR:
    """Sets the strategy's server learning rate before each round."""

    def __init__(self, strategy: ServerStrategy, schedule: ServerLRSchedule):
        peak = strategy.server_lr
        if peak is None and schedule.kind != "constant":
            raise ValueError(
                f"server_lr_schedule.kind={schedule.kind!r}: {strategy_name(strategy)} has no "
                "server learning rate (use fedavgm, fedadam, fedyogi, fedadagrad or scaffold)"
            )
        self.strategy, self.schedule = strategy, schedule
        self.has_lr = peak is not None
        self.peak = float(peak) if peak is not None else 1.0
        schedule.check_peak(self.peak)
        if schedule.kind != "constant" and schedule.num_rounds < schedule.peak_round:
            log.warning(
                "num_rounds=%d ends before the server lr warm-up does (peak at round %d, "
                "server_lr_schedule.warmup_rounds=%d): the run never reaches the server lr %g",
                schedule.num_rounds,
                schedule.peak_round,
                schedule.warmup_rounds,
                self.peak,
            )

    def lr(self, server_round: int) -> float:
        return self.schedule.lr(server_round, self.peak)

    def before_round(self, server_round: int) -> float | None:
        """Set round `server_round`'s lr; returns it (None: the strategy has no server lr)."""
        if not self.has_lr:
            return None
        lr = self.lr(server_round)
        self.strategy.server_lr = lr
        return lr
