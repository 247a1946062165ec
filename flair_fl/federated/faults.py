"""Seeded fault injection in the clients (off by default): for testing a run's resilience.

`client.faults.probability` of the sampled (round, user) pairs fail, each in one of
`client.faults.kinds`, chosen from the run's seed (the same pairs fail on every run):

- raise: the client raises before training (a bug, a bad user file);
- hang:  the client sleeps `hang_s` seconds (a deadlock; killed by simulation.client_timeout);
- die:   the client's process exits at once (an actor killed, e.g. by the OOM killer);
- nan:   the client trains, then replies with NaN weights (a numerical blow-up).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from flair_fl.errors import InjectedFault
from flair_fl.services.seeds import derive_seed

KINDS = ("raise", "hang", "die", "nan")


@dataclass(frozen=True)
class FaultSpec:
    probability: float = 0.0
    kinds: tuple[str, ...] = KINDS
    hang_s: float = 3600.0
    seed: int = 0
    start_round: int = 1  # no faults before this round

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"client.faults.probability must be in [0, 1], got {self.probability}")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown or not self.kinds:
            raise ValueError(
                f"client.faults.kinds: unknown {unknown or 'empty list'}; use some of {list(KINDS)}"
            )

    def draw(self, server_round: int, user_id: str) -> str | None:
        """The fault this (round, user) suffers, or None."""
        if self.probability <= 0.0 or server_round < self.start_round:
            return None
        rng = np.random.default_rng(derive_seed(self.seed, "fault", server_round, user_id))
        if rng.random() >= self.probability:
            return None
        return str(self.kinds[int(rng.integers(len(self.kinds)))])


def before_training(spec: FaultSpec, kind: str | None, user_id: str, server_round: int) -> None:
    """Act out the faults that strike before any work (`nan` strikes after training)."""
    if kind == "raise":
        raise InjectedFault(f"injected fault (raise) for user {user_id} in round {server_round}")
    if kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(spec.hang_s)
