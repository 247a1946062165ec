"""Central user-level DP (`privacy=dp`, `privacy=dp_adaptive`): calibration and reporting.

The noise multiplier z comes from Opacus's accountant for a target (epsilon, delta) over
the planned rounds at sampling rate q = cohort / population. Two reference setups:

- pfl-research (FLAIR benchmark): fixed C, z computed for a simulated deployment with
  `noise_cohort_size` users per round out of `population_size`, and the noise std scaled by
  cohort / noise_cohort so the model sees the noise level of that deployment.
- ml-flair: adaptive clipping (Andrew et al. 2021), population = the train users,
  delta = 1 / n^1.1.

The clipping and noising happen in `CentralDPStages`; this object owns the settings,
the accountant's figures, the per-round metrics and the budget stop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from flair_fl.errors import ConfigError
from flair_fl.privacy import PrivacyContext
from flair_fl.privacy.accounting import (
    ACCOUNTANTS,
    EpsilonCurve,
    default_delta,
    noise_multiplier_for,
    update_noise_multiplier,
)
from flair_fl.privacy.bmf_accounting import participation
from flair_fl.privacy.central_stages import (
    CentralDPStages,
    CorrelatedNoise,
    NoiseSettings,
    RoundStats,
)
from flair_fl.privacy.clipping import QuantileClipNorm
from flair_fl.protocol import UNIFORM_WEIGHT_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptiveClipping:
    """Adaptive clip norm settings (the `privacy.adaptive` node); C starts at clip_norm."""

    target_unclipped_quantile: float = 0.1  # gamma: C tracks this quantile of update norms
    learning_rate: float = 0.2  # eta_C of the geometric update
    clipped_count_stddev: float | None = None  # sigma_b; None: max(noise cohort / 20, z)

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_unclipped_quantile <= 1.0:
            raise ConfigError(
                "privacy.adaptive.target_unclipped_quantile="
                f"{self.target_unclipped_quantile}: must be in [0, 1]"
            )
        _positive("adaptive.learning_rate", self.learning_rate)
        if self.clipped_count_stddev is not None:
            _positive("adaptive.clipped_count_stddev", self.clipped_count_stddev)


@dataclass(frozen=True)
class Calibration:
    """The numbers the mechanism runs with, fixed when the round stages are built."""

    cohort_size: int  # users sampled per round in this run
    noise_cohort_size: int  # cohort the noise is calibrated for (= cohort unless simulating)
    population_size: int  # users the cohort is drawn from, for q
    rounds: int  # the accountant's horizon (planned rounds)
    delta: float
    noise_multiplier: float  # z the accountant sees (update and count noise together)
    update_noise_multiplier: float  # z on the updates (> z with adaptive clipping)
    count_stddev: float | None  # sigma_b (adaptive clipping), for the noise cohort
    simulated: bool  # accounted for a larger cohort / population than this run has

    @property
    def sample_rate(self) -> float:
        return self.noise_cohort_size / self.population_size

    @property
    def noise_scale(self) -> float:
        return self.cohort_size / self.noise_cohort_size


class CentralDP:
    """User-level central DP: clipped updates, Gaussian noise, Opacus accounting."""

    def __init__(
        self,
        clip_norm: float = 0.1,
        epsilon: float | None = 2.0,
        delta: float | None = 1e-5,
        noise_multiplier: float | None = None,
        accountant: str = "rdp",
        epsilon_tolerance: float = 0.01,
        noise_cohort_size: int | None = None,
        population_size: int | None = None,
        max_epsilon: float | None = None,
        adaptive: AdaptiveClipping | None = None,
        secure_noise: bool = True,
    ):
        _positive("clip_norm", clip_norm)
        if not isinstance(secure_noise, bool):
            raise ConfigError(f"privacy.secure_noise={secure_noise!r}: must be true or false")
        if noise_multiplier is None and epsilon is None:
            raise ConfigError("privacy.epsilon=None: set a target epsilon or noise_multiplier")
        for key, value in (
            ("epsilon", epsilon),
            ("noise_multiplier", noise_multiplier),
            ("epsilon_tolerance", epsilon_tolerance),
            ("max_epsilon", max_epsilon),
            ("noise_cohort_size", noise_cohort_size),
            ("population_size", population_size),
        ):
            if value is not None:
                _positive(key, value)
        if delta is not None and not 0.0 < delta < 1.0:
            raise ConfigError(f"privacy.delta={delta}: must be in (0, 1)")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"privacy.accountant={accountant!r}: expected one of {', '.join(ACCOUNTANTS)}"
            )
        self.clip_norm, self.epsilon, self.delta = float(clip_norm), epsilon, delta
        self.noise_multiplier, self.accountant = noise_multiplier, accountant
        self.epsilon_tolerance, self.max_epsilon = float(epsilon_tolerance), max_epsilon
        self.noise_cohort_size, self.population_size = noise_cohort_size, population_size
        self.adaptive, self.secure_noise = adaptive, secure_noise
        self.calibration: Calibration | None = None
        self.stages: CentralDPStages | None = None
        self.curve: EpsilonCurve | None = None

    def calibrate(self, context: PrivacyContext) -> Calibration:
        """z (and z_update) for this run's cohort, population and planned rounds."""
        noise_cohort, population = self._deployment(context)
        delta = float(self.delta) if self.delta is not None else default_delta(population)
        if delta > 1 / population:
            log.warning(
                "privacy.delta=%.3g exceeds 1/population = %.3g (%d users): a mechanism may "
                "then release one user's data outright with probability delta; choose "
                "delta < 1/population (null gives ml-flair's 1/n^1.1)",
                delta,
                1 / population,
                population,
            )
        z = self._noise_multiplier(noise_cohort / population, context.num_rounds, delta)
        count_stddev, z_update = None, z
        if self.adaptive is not None:
            count_stddev = float(
                self.adaptive.clipped_count_stddev or default_count_stddev(noise_cohort, z)
            )
            try:
                z_update = update_noise_multiplier(z, count_stddev)
            except ValueError as err:
                raise ConfigError(
                    f"privacy.adaptive.clipped_count_stddev={count_stddev:.4g}: {err}; raise "
                    "it, or lower the noise multiplier (larger epsilon or cohort)"
                ) from None
        return Calibration(
            cohort_size=context.cohort_size,
            noise_cohort_size=noise_cohort,
            population_size=population,
            rounds=context.num_rounds,
            delta=delta,
            noise_multiplier=z,
            update_noise_multiplier=z_update,
            count_stddev=count_stddev,
            simulated=(noise_cohort, population) != (context.cohort_size, context.population_size),
        )

    def _deployment(self, context: PrivacyContext) -> tuple[int, int]:
        """(noise cohort, population) the guarantee is for: this run's, or a larger
        deployment it simulates."""
        noise_cohort = int(self.noise_cohort_size or context.cohort_size)
        if noise_cohort < context.cohort_size:
            raise ConfigError(
                f"privacy.noise_cohort_size={noise_cohort}: must be >= cohort_size "
                f"({context.cohort_size}); it simulates a larger cohort, never a smaller one"
            )
        population = int(self.population_size or context.population_size)
        if population < noise_cohort:
            raise ConfigError(
                f"privacy.population_size={population}: must be >= the (noise) cohort "
                f"{noise_cohort}"
            )
        return noise_cohort, population

    def _noise_multiplier(self, sample_rate: float, rounds: int, delta: float) -> float:
        """z as set, or the accountant's for the target epsilon over `rounds` rounds."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        try:
            rate, steps = participation(sample_rate, rounds, self.min_separation)
            return noise_multiplier_for(
                float(self.epsilon),  # type: ignore[arg-type]  # checked in __init__
                delta,
                rate,
                steps,
                self.accountant,
                self.epsilon_tolerance,
            )
        except ValueError as err:  # Opacus: "The privacy budget is too low."
            raise ConfigError(f"privacy.epsilon={self.epsilon}: {err}") from None

    def round_stages(self, context: PrivacyContext) -> CentralDPStages:
        """Refuse example weighting, calibrate; the round's clip and noise stages."""
        if context.weighted_by_key != UNIFORM_WEIGHT_KEY:
            raise ConfigError(
                f"aggregation: central DP needs aggregation=uniform (got weighting key "
                f"{context.weighted_by_key!r}); with example weights one user's contribution "
                "is no longer bounded by C / cohort, so the noise would not cover it"
            )
        cal = self.calibrate(context)
        adaptive = None
        if self.adaptive is not None and cal.count_stddev is not None:
            adaptive = QuantileClipNorm(
                clip_norm=self.clip_norm,
                target_unclipped_quantile=self.adaptive.target_unclipped_quantile,
                learning_rate=self.adaptive.learning_rate,
                count_stddev=cal.count_stddev * cal.noise_scale,
                expected_count=cal.cohort_size,
            )
        noise = NoiseSettings(
            cohort_size=cal.cohort_size,
            update_noise_multiplier=cal.update_noise_multiplier,
            noise_scale=cal.noise_scale,
            seed=context.seed,
            secure=self.secure_noise,
        )
        self.calibration = cal
        rate, _ = participation(cal.sample_rate, cal.rounds, self.min_separation)
        self.curve = EpsilonCurve(
            cal.noise_multiplier, rate, cal.delta, self.accountant, cal.rounds, self.min_separation
        )
        self.stages = CentralDPStages(
            noise, self.clip_norm, adaptive, self.correlated_noise(cal.rounds)
        )
        return self.stages

    min_separation = 1  # rounds between a user's participations the accounting assumes

    def correlated_noise(self, rounds: int) -> CorrelatedNoise | None:
        """How noise is correlated across rounds (banded MF); None: independent."""
        return None

    def required_separation(self) -> int | None:
        """None: the guarantee holds for any cohort sampler (Poisson-like, see accounting)."""
        return None

    def client_settings(self) -> dict[str, Any] | None:
        return None  # clients train as usual; the server clips and noises

    def check_model(self, model: nn.Module) -> None:
        return None  # any model: only its trainable parameters are clipped

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon spent after `rounds` rounds (at the delta in use); NaN before round_stages."""
        return self.curve(rounds) if self.curve is not None else float("nan")

    def round_metrics(self, server_round: int) -> dict[str, float]:
        if self.stages is None:
            return {}
        nan = float("nan")
        stats = self.stages.history.get(server_round)
        metrics = {
            "dp_epsilon": self.epsilon_after(server_round),
            "dp_clip_norm": stats.clip_norm if stats else nan,
            "dp_noise_std": stats.noise_std if stats else nan,
            "dp_clipped_fraction": stats.clipped_fraction if stats else nan,
            "dp_update_norm_mean": stats.update_norm_mean if stats else nan,
        }
        if self.adaptive is not None:
            metrics["dp_unclipped_fraction_noisy"] = (
                stats.noisy_unclipped_fraction if stats else nan
            )
        return metrics

    def stop_reason(self, server_round: int) -> str | None:
        if self.max_epsilon is None or self.calibration is None:
            return None
        after = self.epsilon_after(server_round)
        if after <= self.max_epsilon:
            return None
        spent = self.epsilon_after(server_round - 1)
        return (
            f"privacy budget: round {server_round} would raise epsilon to {after:.4f} > "
            f"privacy.max_epsilon={self.max_epsilon} (spent {spent:.4f} after "
            f"{server_round - 1} rounds, delta={self.calibration.delta:.3g})"
        )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the adaptive clip norm and the per-round figures.

        Epsilon is a function of the round number and the noise is drawn from (seed,
        round) or, with secure noise, afresh: nothing else changes from round to round.
        """
        if self.stages is None or self.calibration is None:
            return {}
        return {
            "noise_multiplier": self.calibration.noise_multiplier,
            "clip_norm": self.stages.clip_norm,
            "history": {r: asdict(stats) for r, stats in self.stages.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` after `round_stages`; refuses a changed noise calibration."""
        if not state:
            return
        if self.stages is None or self.calibration is None:
            raise RuntimeError("build the round stages before loading the privacy state")
        if not math.isclose(state["noise_multiplier"], self.calibration.noise_multiplier):
            raise ConfigError(
                "resume: the privacy settings changed (noise multiplier "
                f"{state['noise_multiplier']:.6g} -> {self.calibration.noise_multiplier:.6g}); "
                "the rounds already run were accounted with the old one"
            )
        self.stages.clip_norm = float(state["clip_norm"])
        if self.stages.adaptive is not None:
            self.stages.adaptive.clip_norm = self.stages.clip_norm
        self.stages.history = {int(r): RoundStats(**stats) for r, stats in state["history"].items()}

    def describe(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "mechanism": "central-dp-adaptive-clip" if self.adaptive else "central-dp-fixed-clip",
            "unit": "user",
            "accountant": self.accountant,
            "clip_norm": self.clip_norm,
            "epsilon_target": self.epsilon if self.noise_multiplier is None else None,
            "max_epsilon": self.max_epsilon,
            "noise_source": "os-entropy" if self.secure_noise else "seed",
            "noise_reproducible_from_seed": not self.secure_noise,
        }
        if self.adaptive is not None:
            settings.update(
                target_unclipped_quantile=self.adaptive.target_unclipped_quantile,
                clip_learning_rate=self.adaptive.learning_rate,
            )
        cal = self.calibration
        if cal is None:
            return settings
        settings.update(
            noise_multiplier=cal.noise_multiplier,
            update_noise_multiplier=cal.update_noise_multiplier,
            epsilon=self.epsilon_after(cal.rounds),
            delta=cal.delta,
            q=cal.sample_rate,
            rounds=cal.rounds,
            cohort_size=cal.cohort_size,
            noise_cohort_size=cal.noise_cohort_size,
            population_size=cal.population_size,
            noise_std_on_mean=cal.update_noise_multiplier
            * self.clip_norm
            * cal.noise_scale
            / cal.cohort_size,
            clipped_count_stddev=cal.count_stddev,
            guarantee_for=(
                f"a simulated deployment: {cal.noise_cohort_size} of {cal.population_size} "
                "users per round"
                if cal.simulated
                else "this run's users"
            ),
        )
        return settings


def default_count_stddev(noise_cohort: int, noise_multiplier: float) -> float:
    """sigma_b when `clipped_count_stddev` is null: ml-flair's noise cohort / 20, raised to
    z where that is too small (small cohorts): Andrew et al.'s split needs 2 sigma_b > z, and
    sigma_b >= z keeps the update noise within 2/sqrt(3) = 1.155 times z."""
    return max(noise_cohort / 20, noise_multiplier)


def _positive(key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"privacy.{key}={value!r}: must be a number > 0")
