"""Privacy accounting: noise calibration and the epsilon spent so far.

Every figure is for the Poisson-subsampled Gaussian mechanism, from a library accountant:
`rdp` (Opacus, Renyi DP at Opacus's default orders), `prv` (Opacus, privacy random
variables, tighter) and `pld` (Google's dp-accounting, privacy loss distributions with
pfl-research's settings: see `pld.py`). The RDP epsilon after r steps is the per-step RDP
curve times r, exactly what `RDPAccountant` does internally, so it costs microseconds.
Opacus and dp-accounting are imported on first use: `python -m flair_fl.privacy calibrate
--accountant pld` never loads torch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from flair_fl.privacy.pld import pld_epsilon, pld_noise_multiplier

ACCOUNTANTS = ("rdp", "prv", "pld")
# Opacus's RDPAccountant.DEFAULT_ALPHAS, written out so that importing this module does not
# import Opacus (and torch); tests check that they are equal.
RDP_ORDERS: Sequence[float] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def noise_multiplier_for(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier z reaching (epsilon, delta) after `steps` steps at rate q.

    rdp / prv: Opacus's `get_noise_multiplier`, a binary search that returns the smallest z
    it tried whose epsilon is at most `epsilon` and within `epsilon_tolerance` of it.
    pld: dp-accounting's `calibrate_dp_mechanism` (see `pld.pld_noise_multiplier`); its
    tolerance is on z, so `epsilon_tolerance` does not apply.
    """
    if accountant == "pld":
        return pld_noise_multiplier(epsilon, delta, sample_rate, steps)
    from opacus.accountants.utils import get_noise_multiplier

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
    from opacus.accountants.analysis import rdp as rdp_analysis

    return np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS
        ),
        dtype=float,
    )


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """Opacus's RDP -> (epsilon, delta) conversion at its default orders."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


class EpsilonCurve:
    """Epsilon spent after r rounds of one subsampled Gaussian mechanism (z, q) at delta.

    Each round is one composition, or, for banded matrix factorization with min-separation
    b, a user's r rounds hold at most ceil(r / b) participations (`min_separation`). Cached
    per r: `stop_reason` and `round_metrics` both ask for the same rounds.

    pld costs ~1-2 s per figure, so it is computed exactly at compositions 1-10, every
    `horizon / 100`-th and at the horizon; between those the curve shows the next exact
    figure, an upper bound (epsilon never decreases with more compositions).
    """

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        accountant: str,
        horizon: int = 0,
        min_separation: int = 1,
    ):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}")
        self.noise_multiplier, self.sample_rate = noise_multiplier, sample_rate
        self.delta, self.accountant = delta, accountant
        self.min_separation = min_separation
        self._horizon = self.compositions(horizon)
        self._grid_step = max(1, math.ceil(self._horizon / 100))
        self._rdp = rdp_per_step(noise_multiplier, sample_rate) if accountant == "rdp" else None
        self._cache: dict[int, float] = {0: 0.0}

    def compositions(self, rounds: int) -> int:
        """The most participations of one user in `rounds` rounds."""
        return math.ceil(rounds / self.min_separation)

    def __call__(self, rounds: int) -> float:
        steps = self.compositions(rounds)
        if self.accountant == "pld" and steps > 10 and steps != self._horizon:
            steps = math.ceil(steps / self._grid_step) * self._grid_step
            if steps > self._horizon >= self.compositions(rounds):
                steps = self._horizon
        if steps not in self._cache:
            self._cache[steps] = self._epsilon(steps)
        return self._cache[steps]

    def _epsilon(self, steps: int) -> float:
        if self._rdp is not None:
            return epsilon_from_rdp(self._rdp * steps, self.delta)
        if self.accountant == "pld":
            return pld_epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta)
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = [(self.noise_multiplier, self.sample_rate, steps)]
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
