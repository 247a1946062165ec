"""Privacy accounting with Opacus: noise calibration and the epsilon spent so far.

Every figure comes from Opacus's accountants for the Poisson-subsampled Gaussian mechanism
(`rdp`: Renyi DP with Opacus's default orders; `prv`: privacy random variables, tighter).
The RDP epsilon after r steps is computed from the per-step RDP curve times r, which is
exactly what `RDPAccountant` does internally, so per-round figures cost microseconds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
RDP_ORDERS: Sequence[float] = RDPAccountant.DEFAULT_ALPHAS


def noise_multiplier_for(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier z reaching (epsilon, delta) after `steps` steps at rate q.

    Opacus's `get_noise_multiplier`: a binary search that returns the smallest z it tried
    whose epsilon is at most `epsilon` and within `epsilon_tolerance` of it.
    """
    with warnings.catch_warnings():  # the search's far-off trial values warn about orders
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        )


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Noise multiplier for the updates when the clipped count is noised too.

    Andrew et al. 2021 (Thm. 1): releasing the sum of clipped updates with noise
    z_update * C and the count of unclipped updates (sensitivity 1/2 once centred) with
    noise `count_stddev` is as private as one Gaussian mechanism with multiplier
    z = (z_update^-2 + (2 count_stddev)^-2)^-1/2. Solving for z_update gives the noise the
    updates need so that the pair spends exactly the budget of `noise_multiplier`.
    """
    if noise_multiplier >= 2 * count_stddev:
        raise ValueError(
            f"noise multiplier {noise_multiplier:.4g} needs clipped_count_stddev > "
            f"{noise_multiplier / 2:.4g} (got {count_stddev:.4g})"
        )
    return float((noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5)


def rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step of the subsampled Gaussian mechanism at Opacus's default orders."""
    return np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS
        ),
        dtype=float,
    )


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """Opacus's RDP -> (epsilon, delta) conversion at its default orders."""
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


class EpsilonCurve:
    """Epsilon spent after r rounds of one subsampled Gaussian mechanism (z, q) at delta.

    Cached per r: `stop_reason` and `round_metrics` both ask for the same rounds.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float, accountant: str):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}")
        self.noise_multiplier, self.sample_rate = noise_multiplier, sample_rate
        self.delta, self.accountant = delta, accountant
        self._rdp = rdp_per_step(noise_multiplier, sample_rate) if accountant == "rdp" else None
        self._cache: dict[int, float] = {0: 0.0}

    def __call__(self, rounds: int) -> float:
        if rounds not in self._cache:
            self._cache[rounds] = self._epsilon(rounds)
        return self._cache[rounds]

    def _epsilon(self, rounds: int) -> float:
        if self._rdp is not None:
            return epsilon_from_rdp(self._rdp * rounds, self.delta)
        prv = PRVAccountant()
        prv.history = [(self.noise_multiplier, self.sample_rate, rounds)]
        return float(prv.get_epsilon(delta=self.delta))


class SampleLevelLedger:
    """Per-user composition of local DP-SGD runs (RDP), for the sample-level guarantee.

    An image belongs to one user and is only touched when that user trains, so its
    privacy loss is the composition of that user's DP-SGD runs. `worst_epsilon` is the
    largest such loss over all users seen: a bound for every image in the run. Each user
    is kept as {sampling rate: total steps} (its RDP is linear in the steps).
    """

    def __init__(self, noise_multiplier: float, delta: float):
        self.noise_multiplier, self.delta = noise_multiplier, delta
        self.user_steps: dict[str, dict[float, int]] = {}
        self.worst_epsilon = 0.0
        self._per_step: dict[float, np.ndarray] = {}

    def _rdp(self, steps_by_rate: dict[float, int]) -> np.ndarray:
        total = np.zeros(len(RDP_ORDERS))
        for rate, steps in steps_by_rate.items():
            if rate not in self._per_step:
                self._per_step[rate] = rdp_per_step(self.noise_multiplier, rate)
            total = total + self._per_step[rate] * steps
        return total

    def record(self, user_id: str, sample_rate: float, steps: int) -> float:
        """Compose one participation; returns that participation's own epsilon."""
        if steps <= 0:
            return 0.0
        history = self.user_steps.setdefault(user_id, {})
        history[sample_rate] = history.get(sample_rate, 0) + steps
        composed = epsilon_from_rdp(self._rdp(history), self.delta)
        self.worst_epsilon = max(self.worst_epsilon, composed)
        return epsilon_from_rdp(self._rdp({sample_rate: steps}), self.delta)


def default_delta(population_size: int) -> float:
    """ml-flair's delta = 1 / n^1.1 for a population of n users."""
    return float(1.0 / math.pow(population_size, 1.1))
