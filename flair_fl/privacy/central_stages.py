"""Central user-level DP as stages of the round (privacy/stages.py): clip, sum, noise.

Each round: every reply's update (its weights minus the global weights sent) is clipped to
L2 norm C as it arrives; the clipped updates are summed; Gaussian noise with std z*C (times
cohort/noise_cohort when simulating a larger cohort) is added to the sum; the sum is divided
by the *sampled* cohort size, however many replies came back. The strategy's server step
then receives that noised mean (global weights + noised mean update), so its server
optimizer (FedAdam's moments, FedAvgM's momentum, ...) acts on the private aggregate:
everything after the noise is post-processing.

Why not Flower's `DifferentialPrivacyServerSide*Clipping`: they add the noise to what the
wrapped strategy returns, i.e. *after* FedAdam's step (whose per-user sensitivity is not
C/cohort, so the guarantee does not hold); they skip aggregation if any client failed;
their noise is calibrated for uniform weights but not enforced; they draw noise from the
global numpy RNG (neither reproducible from the run's seed nor keyed from the OS); and the
adaptive variant calibrates the noise with the clip norm of the *next* round and moves the
norm away from the requested quantile (its formula uses the clipped fraction; see tests).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, Message

from flair_fl.privacy.clip import UpdateClip
from flair_fl.privacy.clipping import QuantileClipNorm
from flair_fl.privacy.stages import RoundSum
from flair_fl.protocol import Layout, flatten_record
from flair_fl.services.seeds import derive_seed


@dataclass(frozen=True)
class NoiseSettings:
    """How much noise the stages add, derived once from the accountant."""

    cohort_size: int  # users sampled per round: the denominator of the mean, always
    update_noise_multiplier: float  # z (with adaptive clipping: z raised for the count noise)
    noise_scale: float = 1.0  # cohort / noise_cohort (< 1 only when simulating a larger cohort)
    seed: int = 0
    secure: bool = False  # True: keyed from the OS each round, nobody can regenerate it

    def generator(self, server_round: int) -> np.random.Generator:
        """This round's noise generator (Gaussian noise, and the adaptive count noise).

        Seeded: a function of (seed, round), so a run and its resume draw the same noise,
        and so can anyone holding the config. Secure: numpy's Philox (a counter-based
        generator built on a block cipher's rounds) keyed with 128 bits from the OS's
        CSPRNG (`secrets`), fresh every round and never stored.
        """
        if self.secure:
            return np.random.Generator(np.random.Philox(key=secrets.randbits(128)))
        return np.random.default_rng(derive_seed(self.seed, "central-dp", server_round))


@dataclass(frozen=True)
class RoundStats:
    """What the mechanism did in one round (logged through `round_metrics`)."""

    clip_norm: float  # C used to clip this round's updates
    noise_std: float  # per-coordinate std of the noise on the mean update
    clipped_fraction: float  # share of received updates with norm > C (not privatised)
    update_norm_mean: float  # mean L2 norm of received updates before clipping (not privatised)
    received: int  # replies aggregated
    noisy_unclipped_fraction: float = float("nan")  # adaptive clipping's private estimate


class CorrelatedNoise(Protocol):
    """Turns each round's independent Gaussian noise into correlated noise (banded MF)."""

    def step(self, noise: np.ndarray) -> np.ndarray:
        """This round's noise from this round's independent draw (rounds in order)."""
        ...


class CentralDPStages:
    """User-level central DP as round stages: clip each update to C as it arrives, noise
    the sum, divide by the sampled cohort (fixed or adaptive C).

    `history` holds one `RoundStats` per aggregated round; the privacy object reads it.
    """

    def __init__(
        self,
        noise: NoiseSettings,
        clip_norm: float,
        adaptive: QuantileClipNorm | None = None,
        correlated: CorrelatedNoise | None = None,
    ):
        self.noise, self.adaptive, self.correlated = noise, adaptive, correlated
        self.clip_norm = adaptive.clip_norm if adaptive is not None else clip_norm
        self.history: dict[int, RoundStats] = {}
        self.clip: UpdateClip | None = None

    def __repr__(self) -> str:
        return f"CentralDPStages({'adaptive' if self.adaptive else 'fixed'} clipping)"

    def noise_std_on_sum(self, clip_norm: float) -> float:
        """Std of the Gaussian noise added to the sum of clipped updates."""
        return self.noise.update_noise_multiplier * clip_norm * self.noise.noise_scale

    def begin_round(self, server_round: int, arrays: ArrayRecord, payload: ArrayRecord) -> None:
        """Measure this round's updates from `arrays`; refuse a payload with client state."""
        _require_same_keys(payload.keys(), arrays.keys(), "sends")
        layout, current = flatten_record(arrays)
        self.clip = UpdateClip(layout, current.astype(np.float64), self.clip_norm)

    def per_update(self, layout: Layout, flat: np.ndarray) -> np.ndarray | str:
        """The reply's update (weights - global), clipped to L2 norm C."""
        if self.clip is None:
            raise RuntimeError("begin_round must run before the round's replies")
        return self.clip(layout, flat)

    def on_sum(self, server_round: int, summed: RoundSum) -> ArrayRecord | None:
        """Noise the clipped sum, divide by the sampled cohort: global + the private mean."""
        clip = self.clip
        if clip is None:
            raise RuntimeError("begin_round must run before the round's sum")
        std_sum = self.noise_std_on_sum(clip.clip_norm)
        stats = RoundStats(
            clip_norm=clip.clip_norm,
            noise_std=std_sum / self.noise.cohort_size,
            clipped_fraction=clip.clipped_fraction,
            # fsum: exact, so the order the replies arrived in does not show (as in the sum)
            update_norm_mean=math.fsum(clip.norms) / len(clip.norms) if clip.norms else math.nan,
            received=summed.count,
        )
        self.history[server_round] = stats
        rng = self.noise.generator(server_round)
        noise = rng.normal(0.0, std_sum, size=clip.layout.size)
        if self.correlated is not None:  # every round is a row of C, even an empty one
            noise = self.correlated.step(noise)
        if not summed.count or summed.total is None:  # the round still counts in the accountant
            return None
        noisy_sum = summed.total + noise
        if self.adaptive is not None:
            fraction = self.adaptive.update(clip.unclipped_count, summed.count, rng)
            self.clip_norm = self.adaptive.clip_norm
            self.history[server_round] = RoundStats(
                **{**stats.__dict__, "noisy_unclipped_fraction": fraction}
            )
        private = clip.current + noisy_sum / self.noise.cohort_size
        return clip.layout.to_record(private.astype(np.float32))

    def after_round(self, server_round: int, accepted: list[Message]) -> None:
        pass


def _require_same_keys(keys: Iterable[str], weights: Iterable[str], verb: str) -> None:
    extra = sorted(set(keys) - set(weights))
    if extra:
        raise ValueError(
            f"central DP clips and noises model weights only, but the strategy {verb} more "
            f"arrays ({', '.join(extra[:3])}, ...): client state such as SCAFFOLD's control "
            "variates would leave the privacy guarantee; use a strategy without it"
        )
