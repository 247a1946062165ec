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
global numpy RNG (not reproducible from the run's seed); and the adaptive variant
calibrates the noise with the clip norm of the *next* round and moves the norm away from
the requested quantile (its formula uses the clipped fraction; see tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from flair_fl.federated.sampling import derive_seed
from flair_fl.federated.wrapper import DelegatingStrategy
from flair_fl.privacy.clipping import (
    Arrays,
    QuantileClipNorm,
    add_gaussian_noise,
    clip_and_sum,
)


@dataclass(frozen=True)
class NoiseSettings:
    """How much noise the wrapper adds, derived once from the accountant."""

    cohort_size: int  # users sampled per round: the denominator of the mean, always
    update_noise_multiplier: float  # z (with adaptive clipping: z raised for the count noise)
    noise_scale: float = 1.0  # cohort / noise_cohort (< 1 only when simulating a larger cohort)
    seed: int = 0


@dataclass(frozen=True)
class RoundStats:
    """What the mechanism did in one round (logged through `round_metrics`)."""

    clip_norm: float  # C used to clip this round's updates
    noise_std: float  # per-coordinate std of the noise on the mean update
    clipped_fraction: float  # share of received updates with norm > C (not privatised)
    update_norm_mean: float  # mean L2 norm of received updates before clipping (not privatised)
    received: int  # replies aggregated
    noisy_unclipped_fraction: float = float("nan")  # adaptive clipping's private estimate


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
    ):
        super().__init__(strategy)
        self.noise, self.adaptive = noise, adaptive
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, sum, noise, divide by the sampled cohort; the wrapped strategy does the rest."""
        if self.current_arrays is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        ok = [reply for reply in replies if not reply.has_error()]
        names = list(self.current_arrays.keys())
        current = [self.current_arrays[name].numpy() for name in names]
        clip_norm = self.clip_norm
        summed = clip_and_sum(
            (_update(reply, names, current) for reply in ok), clip_norm, [c.shape for c in current]
        )
        std_sum = self.noise_std_on_sum(clip_norm)
        stats = RoundStats(
            clip_norm=clip_norm,
            noise_std=std_sum / self.noise.cohort_size,
            clipped_fraction=summed.clipped_fraction,
            update_norm_mean=float(np.mean(summed.norms)) if ok else float("nan"),
            received=len(ok),
        )
        self.history[server_round] = stats
        if not ok:  # nothing to aggregate; the round still counts in the accountant
            return None, None
        rng = np.random.default_rng(derive_seed(self.noise.seed, "central-dp", server_round))
        noisy_sum = add_gaussian_noise(summed.total, std_sum, rng)
        if self.adaptive is not None:
            fraction = self.adaptive.update(summed.unclipped_count, len(ok), rng)
            self.clip_norm = self.adaptive.clip_norm
            self.history[server_round] = RoundStats(
                **{**stats.__dict__, "noisy_unclipped_fraction": fraction}
            )
        return self._delegate(server_round, ok, names, current, noisy_sum)

    def _delegate(
        self,
        server_round: int,
        replies: list[Message],
        names: list[str],
        current: Arrays,
        noisy_sum: Arrays,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand global weights + noised mean update to the wrapped strategy as one reply."""
        cohort = self.noise.cohort_size
        private = ArrayRecord(
            {
                name: Array(np.asarray(c + total / cohort, dtype=c.dtype))
                for name, c, total in zip(names, current, noisy_sum, strict=True)
            }
        )
        weight_key = str(getattr(self.strategy, "weighted_by_key", "uniform-weight"))
        aggregate: Callable[[list[RecordDict], str], MetricRecord] = getattr(
            self.strategy, "train_metrics_aggr_fn", aggregate_metricrecords
        )
        metrics = aggregate([reply.content for reply in replies], weight_key)
        first = replies[0].content
        content = RecordDict(
            {
                next(iter(first.array_records)): private,
                next(iter(first.metric_records)): MetricRecord({**metrics, weight_key: 1}),
            }
        )
        merged = Message(content, reply_to=replies[0])  # shaped like any reply
        arrays, _ = self.strategy.aggregate_train(server_round, [merged])
        return arrays, metrics


def _require_same_keys(keys: Iterable[str], weights: Iterable[str], verb: str) -> None:
    extra = sorted(set(keys) - set(weights))
    if extra:
        raise ValueError(
            f"central DP clips and noises model weights only, but the strategy {verb} more "
            f"arrays ({', '.join(extra[:3])}, ...): client state such as SCAFFOLD's control "
            "variates would leave the privacy guarantee; use a strategy without it"
        )


def _update(reply: Message, names: list[str], current: Arrays) -> Arrays:
    record = next(iter(reply.content.array_records.values()))
    _require_same_keys(record.keys(), names, "receives")
    return [record[name].numpy() - c for name, c in zip(names, current, strict=True)]
