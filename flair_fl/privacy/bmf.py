"""Banded matrix factorization (DP-FTRL with correlated noise), `privacy=dp_bmf`.

The matrix mechanism releases the prefix sums A x of the rounds' clipped update sums x as
B (C x + Z), with A = B C and Z i.i.d. Gaussian: equivalently each round adds the noise
(C^-1 Z)_t, so noise added in one round is partly cancelled in later ones. C is lower
triangular with `bands` bands and unit column norms: a user who participates once
changes C x by at most C (clip norm) in L2, and with participations at least `bands`
rounds apart (the min-separation sampler) their columns do not overlap.

C comes from bmf_factorization.py: `optimized` (default) minimises pfl-research's objective,
the prefix-sum error ||A C^-1||_F^2 over banded C with unit column norms, for the run's
`num_rounds` (cached); `sqrt` is the closed-form banded square root (Kalinin & Lampert
2024). Accounting: bmf_accounting.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from flair_fl.errors import ConfigError
from flair_fl.privacy import PrivacyContext
from flair_fl.privacy.bmf_accounting import participation
from flair_fl.privacy.bmf_factorization import (
    FACTORIZATIONS,
    bsr_coefficients,
    column_norms,
    dense,
    prefix_sum_loss,
    sqrt_band,
    strategy_band,
)
from flair_fl.privacy.central import Calibration, CentralDP

__all__ = ["BandedMFDP", "BandedNoise", "bsr_coefficients", "strategy_matrix"]


def strategy_matrix(rounds: int, bands: int) -> np.ndarray:
    """The dense banded square root C (rounds x rounds), for inspection and tests."""
    return dense(sqrt_band(rounds, bands))


class BandedNoise:
    """(C^-1 z)_t round by round by forward substitution, keeping the last bands-1 outputs.

    `band` is C in lower band storage (band[k, j] = C[j + k, j]); round t (from 0) computes
    w_t = (z_t - sum_{k=1}^{bands-1} C[t, t-k] w_{t-k}) / C[t, t]. The kept outputs (float32,
    one model-sized vector each) and the round index are the mechanism's only state.
    """

    def __init__(self, band: np.ndarray):
        self.band = np.asarray(band, dtype=np.float64)
        self.round = 0
        self.previous: list[np.ndarray] = []  # w_{t-1}, w_{t-2}, ... (most recent first)

    def step(self, noise: np.ndarray) -> np.ndarray:
        """This round's correlated noise from its independent draw `noise` (= z_t)."""
        t = self.round
        if t >= self.band.shape[1]:
            raise RuntimeError(f"banded MF: C was built for {self.band.shape[1]} rounds only")
        out = np.array(noise, dtype=np.float64)
        for k, w in enumerate(self.previous, start=1):
            out -= self.band[k, t - k] * w
        out /= self.band[0, t]
        self.previous = [out.astype(np.float32), *self.previous][: self.band.shape[0] - 1]
        self.round += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "previous": [torch.from_numpy(w) for w in self.previous]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):  # written before C could vary by row
            raise ValueError("banded MF: this checkpoint's noise state predates C's row index")
        self.round = int(state["round"])
        self.previous = [w.numpy() for w in state["previous"]]


class BandedMFDP(CentralDP):
    """Central user-level DP with banded-MF correlated noise and min-separation sampling.

    Clipping, summing, the Gaussian draw and the server optimizer are `CentralDP`'s; this
    class adds the correlation, the sampler that enforces the participation pattern and
    the amplified accounting. Adaptive clipping is not offered (its count noise is not
    covered by the banded analysis).
    """

    def __init__(
        self,
        min_separation: int = 48,
        bands: int | None = None,
        factorization: str = "optimized",
        factorization_cache: str | None = None,
        **kwargs: Any,
    ):
        if kwargs.get("adaptive") is not None:
            raise ConfigError("privacy.adaptive: not available with privacy=dp_bmf (fixed C)")
        super().__init__(**kwargs)
        if not isinstance(min_separation, int) or isinstance(min_separation, bool):
            raise ConfigError(f"privacy.min_separation={min_separation!r}: an integer >= 2")
        if min_separation < 2:
            raise ConfigError(f"privacy.min_separation={min_separation}: must be >= 2")
        bands = min_separation - 1 if bands is None else bands  # pfl-research's choice
        if not 1 <= bands <= min_separation:
            raise ConfigError(
                f"privacy.bands={bands}: must be in [1, privacy.min_separation="
                f"{min_separation}] (more bands than the separation would let a user's "
                "participations overlap in C)"
            )
        if factorization not in FACTORIZATIONS:
            raise ConfigError(
                f"privacy.factorization={factorization!r}: one of {', '.join(FACTORIZATIONS)}"
            )
        self.min_separation, self.bands = min_separation, bands
        self.factorization, self.factorization_cache = factorization, factorization_cache
        self.strategy_stats: dict[str, float] = {}
        self.noise_state: BandedNoise | None = None

    def calibrate(self, context: PrivacyContext) -> Calibration:
        """CentralDP's calibration over ceil(T / b) participations at rate b * q."""
        noise_cohort = self.noise_cohort_size or context.cohort_size
        population = self.population_size or context.population_size
        try:
            participation(noise_cohort / population, context.num_rounds, self.min_separation)
        except ValueError as err:
            raise ConfigError(f"privacy.min_separation={self.min_separation}: {err}") from None
        return super().calibrate(context)

    def correlated_noise(self, rounds: int) -> BandedNoise:
        band = strategy_band(self.factorization, rounds, self.bands, self.factorization_cache)
        loss = prefix_sum_loss(band)
        self.strategy_stats = {
            "column_norm_max": float(np.max(column_norms(band))),
            "prefix_sum_loss": loss,  # ||A C^-1||_F^2: noise variance summed over prefix sums
            "prefix_sum_rmse": math.sqrt(loss / rounds),  # per prefix sum, in units of sigma
        }
        self.noise_state = BandedNoise(band)
        return self.noise_state

    def required_separation(self) -> int | None:
        """min_separation: the sensitivity (one column of C per participation) needs it."""
        return self.min_separation

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state and self.noise_state is not None:
            state["banded_noise"] = self.noise_state.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state and self.noise_state is not None:
            self.noise_state.load_state_dict(state["banded_noise"])

    def describe(self) -> dict[str, Any]:
        settings = super().describe()
        settings["mechanism"] = "central-dp-banded-mf"
        settings.update(
            min_separation=self.min_separation,
            bands=self.bands,
            factorization=self.factorization,
            **self.strategy_stats,
        )
        cal = self.calibration
        if cal is not None:
            settings.update(
                participations_per_user=math.ceil(cal.rounds / self.min_separation),
                q_per_participation=cal.sample_rate * self.min_separation,
            )
        return settings
