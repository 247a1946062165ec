"""Central user-level DP as a Flower strategy wrapper (clip, sum, noise, then the server optimizer).

Each round: every reply's update (its weights minus the global weights sent) is clipped to
L2 norm C; the clipped updates are summed; Gaussian noise with std z*C (times
cohort/noise_cohort when simulating a larger cohort) is added to the sum; the sum is divided
by the *sampled* cohort size, however many replies came back. The wrapped strategy then
receives that noised mean as a single reply (global weights + noised mean update), so its
own server optimizer (FedAdam's moments, FedAvgM's momentum, ...) acts on the private
aggregate: everything after the noise is post-processing.

Why not Flower's `DifferentialPrivacyServerSide*Clipping`: they add the noise to what the
wrapped strategy returns, i.e. *after* FedAdam's step (whose per-user sensitivity is not
C/cohort, so the guarantee does not hold); they skip aggregation if any client failed;
their noise is calibrated for uniform weights but not enforced; they draw noise from the
global numpy RNG (neither reproducible from the run's seed nor keyed from the OS); and the
adaptive variant calibrates the noise with the clip norm of the *next* round and moves the
norm away from the requested quantile (its formula uses the clipped fraction; see tests).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flair_fl.federated.protocol import flatten_record
from flair_fl.federated.reduce import REPLIES_KEY, ClipReduction, MetricsReduction, merged_reply
from flair_fl.federated.wrapper import DelegatingStrategy
from flair_fl.privacy.clipping import QuantileClipNorm
from flair_fl.services.seeds import derive_seed


@dataclass(frozen=True)
class NoiseSettings:
    """How much noise the wrapper adds, derived once from the accountant."""

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


class CentralDPStrategy(DelegatingStrategy):
    """Wraps a Flower strategy with user-level central DP (fixed or adaptive clip norm).

    `history` holds one `RoundStats` per aggregated round; the privacy object reads it.
    """

    def __init__(
        self,
        strategy: Strategy,
        noise: NoiseSettings,
        clip_norm: float,
        adaptive: QuantileClipNorm | None = None,
        correlated: CorrelatedNoise | None = None,
    ):
        super().__init__(strategy)
        self.noise, self.adaptive, self.correlated = noise, adaptive, correlated
        self.clip_norm = adaptive.clip_norm if adaptive is not None else clip_norm
        self.history: dict[int, RoundStats] = {}
        self.current_arrays: ArrayRecord | None = None

    def __repr__(self) -> str:
        kind = "adaptive" if self.adaptive else "fixed"
        return f"CentralDPStrategy({kind} clipping, {self.strategy!r})"

    def noise_std_on_sum(self, clip_norm: float) -> float:
        """Std of the Gaussian noise added to the sum of clipped updates."""
        return self.noise.update_noise_multiplier * clip_norm * self.noise.noise_scale

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global weights (updates are measured from them); delegate."""
        self.current_arrays = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        for message in messages[:1]:
            for record in message.content.array_records.values():
                _require_same_keys(record.keys(), arrays.keys(), "sends")
        return messages

    def reduction(self) -> ClipReduction:
        """An empty clipped sum for this round (the round loop adds replies as they come)."""
        if self.current_arrays is None:
            raise RuntimeError("configure_train must run before the round's replies")
        layout, current = flatten_record(self.current_arrays)
        return ClipReduction(layout, current.astype(np.float64), self.clip_norm)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, sum, noise, divide by the sampled cohort; the wrapped strategy does the rest."""
        reduction = self.reduction()
        ok = [reply for reply in replies if not reply.has_error()]
        weight_key = str(getattr(self.strategy, "weighted_by_key", "uniform-weight"))
        metrics = MetricsReduction(weight_key)
        for reply in ok:
            layout, flat = flatten_record(next(iter(reply.content.array_records.values())))
            if reduction.add(layout, flat, 1.0) is None:
                metrics.add(next(iter(reply.content.metric_records.values())))
        summary = metrics.result()
        arrays = self.aggregate_clipped(server_round, reduction, summary, ok[0] if ok else None)
        return arrays, (MetricRecord(dict(summary)) if arrays is not None else None)

    def aggregate_clipped(
        self,
        server_round: int,
        reduction: ClipReduction,
        metrics: dict[str, Any],
        template: Message | None,
    ) -> ArrayRecord | None:
        """Noise the clipped sum, divide by the sampled cohort, delegate as one reply."""
        clip_norm = reduction.clip_norm
        std_sum = self.noise_std_on_sum(clip_norm)
        stats = RoundStats(
            clip_norm=clip_norm,
            noise_std=std_sum / self.noise.cohort_size,
            clipped_fraction=reduction.clipped_fraction,
            update_norm_mean=float(np.mean(reduction.norms)) if reduction.norms else float("nan"),
            received=reduction.count,
        )
        self.history[server_round] = stats
        rng = self.noise.generator(server_round)
        noise = rng.normal(0.0, std_sum, size=reduction.total.shape)
        if self.correlated is not None:  # every round is a row of C, even an empty one
            noise = self.correlated.step(noise)
        if not reduction.count or template is None:  # the round still counts in the accountant
            return None
        noisy_sum = reduction.total + noise
        if self.adaptive is not None:
            fraction = self.adaptive.update(reduction.unclipped_count, reduction.count, rng)
            self.clip_norm = self.adaptive.clip_norm
            self.history[server_round] = RoundStats(
                **{**stats.__dict__, "noisy_unclipped_fraction": fraction}
            )
        private = reduction.current + noisy_sum / self.noise.cohort_size
        record = reduction.layout.to_record(private.astype(np.float32))
        weight_key = str(getattr(self.strategy, "weighted_by_key", "uniform-weight"))
        merged = merged_reply(
            record, {**metrics, REPLIES_KEY: reduction.count}, weight_key, 1, template
        )
        arrays, _ = self.strategy.aggregate_train(server_round, [merged])
        return arrays


def _require_same_keys(keys: Iterable[str], weights: Iterable[str], verb: str) -> None:
    extra = sorted(set(keys) - set(weights))
    if extra:
        raise ValueError(
            f"central DP clips and noises model weights only, but the strategy {verb} more "
            f"arrays ({', '.join(extra[:3])}, ...): client state such as SCAFFOLD's control "
            "variates would leave the privacy guarantee; use a strategy without it"
        )
