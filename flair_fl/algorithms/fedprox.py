"""AdaFedProx (`strategy=adafedprox`): FedProx whose proximal weight mu follows a central
validation metric. The server sends mu with every round (`proximal-mu`); clients add
mu/2 ||w - w_global||^2 to their loss (learning/local_training.py). Plain FedProx
(`strategy=fedprox`) is Flower's, through the contract's adapter.

The rule is pfl-research's `AdaptMuOnMetricCallback` (after Li et al. 2020, "Federated
Optimization in Heterogeneous Networks", appendix C.3.3). Every `every` rounds the central
val metric (lower is better) is compared with its value at the previous adaptation:

- lower: one more consecutive improvement; once there are `decrease_after` of them in a
  row, mu <- max(0, mu - step) (and again at every further improvement in that streak);
- not lower: the streak is reset and mu <- min(1, mu + step).

The first comparison is against +inf, so it always counts as an improvement. Adaptations
happen at flair-fl's evaluation rounds 0 (the untrained model), every, 2*every, ...; the
new mu trains from the next round on. pfl runs the same sequence one round later (its
callback fires after a round's training, and its evaluation rounds are 0-based), so the
sequence of mu values across adaptations is the same for the same sequence of metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord

from flair_fl.protocol import PROXIMAL_MU_KEY

METRICS = ("val_loss",)  # central val metrics where lower is better


class AdaFedProx:
    """FedProx for an adapted mu: the server step is the mean itself (FedAvg); the payload
    carries this round's mu. Starting at mu = 0 is meant here (pfl-research's FLAIR
    setting)."""

    server_lr: float | None = None  # FedAvg's step has no learning rate

    def __init__(self, proximal_mu: float = 0.0, weighted_by_key: str = "uniform-weight"):
        self.proximal_mu, self.weight_key = proximal_mu, weighted_by_key

    def payload(
        self, server_round: int, arrays: ArrayRecord, config: dict[str, Any]
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """The weights, and this round's mu for the clients' proximal term."""
        return arrays, {**config, PROXIMAL_MU_KEY: self.proximal_mu}

    def server_step(self, server_round: int, mean: ArrayRecord, replies: int) -> ArrayRecord:
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {}  # mu and its streak are AdaptiveMu's (the tracker's checkpoint entry)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class AdaptiveMu:
    """mu of a FedProx strategy, adapted on a central val metric (module doc)."""

    strategy: AdaFedProx
    every: int = 20  # pfl-research's FLAIR setting: adafedprox_adapt_frequency 20
    step: float = 0.1
    decrease_after: int = 1  # consecutive improvements before mu decreases
    metric: str = "val_loss"
    improvements: int = field(default=0, init=False)
    previous: float = field(default=math.inf, init=False)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"strategy.adaptive_mu.every={self.every}: must be >= 1")
        if self.metric not in METRICS:
            raise ValueError(
                f"strategy.adaptive_mu.metric={self.metric!r}: expected one of {METRICS} "
                "(a central val metric where lower is better)"
            )

    @property
    def mu(self) -> float:
        return float(self.strategy.proximal_mu)

    def observe(self, server_round: int, metrics: dict[str, Any]) -> None:
        """Adapt mu after round `server_round`'s central evaluation (`metrics` hold it)."""
        if server_round % self.every:
            return
        value = float(metrics[self.metric])
        mu = self.mu
        if value < self.previous:
            self.improvements += 1
            if self.improvements >= self.decrease_after:
                mu = max(0.0, mu - self.step)
        else:
            self.improvements = 0
            mu = min(1.0, mu + self.step)
        self.previous = value
        self.strategy.proximal_mu = mu

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint keeps (mu, the streak and the last value compared)."""
        return {"mu": self.mu, "improvements": self.improvements, "previous": self.previous}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.strategy.proximal_mu = float(state["mu"])
        self.improvements = int(state["improvements"])
        self.previous = float(state["previous"])
