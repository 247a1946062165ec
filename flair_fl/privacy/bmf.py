"""Banded matrix factorization (DP-FTRL with correlated noise), `privacy=dp_bmf`.

The matrix mechanism releases the prefix sums A x of the rounds' clipped update sums x as
B (C x + Z), with A = B C and Z i.i.d. Gaussian: equivalently each round adds the noise
(C^-1 Z)_t, so noise added in one round is partly cancelled in later ones. C is lower
triangular with `bands` bands and unit column norms: a user who participates once
changes C x by at most C (clip norm) in L2, and with participations at least `bands`
rounds apart (the min-separation sampler) their columns do not overlap.

flair-fl's C is the banded square root (Kalinin & Lampert 2024): the Toeplitz square root
of A, whose coefficients are binom(2k, k) / 4^k, truncated to `bands` bands and divided
by its column norm. It is a closed form (no optimisation over T x T matrices) and needs
only the `bands` coefficients; pfl-research instead optimises a banded C numerically for
its `num_rounds` (see README). Accounting: bmf_accounting.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from flair_fl.errors import ConfigError
from flair_fl.federated.sampling import MinSeparationSampler
from flair_fl.privacy import PrivacyContext
from flair_fl.privacy.bmf_accounting import participation
from flair_fl.privacy.central import Calibration, CentralDP


def bsr_coefficients(bands: int) -> np.ndarray:
    """c_0..c_{bands-1} of the banded square root, scaled so that a full column has norm 1."""
    c = np.ones(bands)
    for k in range(1, bands):
        c[k] = c[k - 1] * (2 * k - 1) / (2 * k)  # binom(2k, k) / 4^k, recursively
    return c / np.linalg.norm(c)


def strategy_matrix(rounds: int, bands: int) -> np.ndarray:
    """The dense lower-triangular Toeplitz C (rounds x rounds), for inspection and tests."""
    c = bsr_coefficients(bands)
    matrix = np.zeros((rounds, rounds))
    for k in range(min(bands, rounds)):
        matrix += np.diag(np.full(rounds - k, c[k]), -k)
    return matrix


class BandedNoise:
    """(C^-1 z)_t round by round by forward substitution, keeping the last bands-1 outputs.

    w_t = (z_t - sum_{k=1}^{bands-1} c_k w_{t-k}) / c_0. The kept outputs (float32, one
    model-sized vector each) are the mechanism's only state.
    """

    def __init__(self, bands: int):
        self.coefficients = bsr_coefficients(bands)
        self.previous: list[np.ndarray] = []  # w_{t-1}, w_{t-2}, ... (most recent first)

    def step(self, noise: np.ndarray) -> np.ndarray:
        """This round's correlated noise from its independent draw `noise` (= z_t)."""
        out = np.array(noise, dtype=np.float64)
        for c_k, w in zip(self.coefficients[1:], self.previous, strict=False):
            out -= c_k * w
        out /= self.coefficients[0]
        self.previous = [out.astype(np.float32), *self.previous][: len(self.coefficients) - 1]
        return out

    def state_dict(self) -> list[torch.Tensor]:
        return [torch.from_numpy(w) for w in self.previous]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        self.previous = [w.numpy() for w in state]


class BandedMFDP(CentralDP):
    """Central user-level DP with banded-MF correlated noise and min-separation sampling.

    Clipping, summing, the Gaussian draw and the server optimizer are `CentralDP`'s; this
    class adds the correlation, the sampler that enforces the participation pattern and
    the amplified accounting. Adaptive clipping is not offered (its count noise is not
    covered by the banded analysis).
    """

    def __init__(self, min_separation: int = 48, bands: int | None = None, **kwargs: Any):
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
        self.min_separation, self.bands = min_separation, bands
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
        self.noise_state = BandedNoise(self.bands)
        return self.noise_state

    def make_sampler(self, user_ids: list[str], cohort_size: int, seed: int) -> Any:
        try:
            return MinSeparationSampler(user_ids, cohort_size, seed, self.min_separation)
        except ValueError as err:
            raise ConfigError(f"privacy.min_separation={self.min_separation}: {err}") from None

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
            factorization="banded square root (Toeplitz), unit column norms",
            column_norm_max=1.0,
        )
        cal = self.calibration
        if cal is not None:
            settings.update(
                participations_per_user=math.ceil(cal.rounds / self.min_separation),
                q_per_participation=cal.sample_rate * self.min_separation,
            )
        return settings
