"""The arithmetic of central DP: clip updates, sum, add Gaussian noise, adapt the clip norm.

Plain numpy on lists of arrays (one per model tensor); no Flower, no accounting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

Arrays = list[np.ndarray]


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm of all arrays taken together (as one flat vector)."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


@dataclass
class ClippedSum:
    """Sum of clipped updates, with the pre-clipping norms for diagnostics."""

    total: Arrays  # float64, one array per model tensor
    norms: list[float]  # each update's L2 norm before clipping
    clip_norm: float

    @property
    def count(self) -> int:
        return len(self.norms)

    @property
    def clipped_fraction(self) -> float:
        """Share of updates that were scaled down (norm > C); NaN with no updates."""
        if not self.norms:
            return float("nan")
        return sum(n > self.clip_norm for n in self.norms) / len(self.norms)

    @property
    def unclipped_count(self) -> int:
        """Updates with norm <= C (the count adaptive clipping privatises)."""
        return sum(n <= self.clip_norm for n in self.norms)


def clip_and_sum(
    updates: Iterable[Arrays], clip_norm: float, shapes: Sequence[tuple[int, ...]]
) -> ClippedSum:
    """Scale each update to L2 norm <= `clip_norm` (McMahan et al.'s flat clipping); sum."""
    total = [np.zeros(shape, dtype=np.float64) for shape in shapes]
    norms: list[float] = []
    for update in updates:
        norm = l2_norm(update)
        scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        for acc, part in zip(total, update, strict=True):
            acc += np.asarray(part, dtype=np.float64) * scale
        norms.append(norm)
    return ClippedSum(total, norms, clip_norm)


def add_gaussian_noise(arrays: Arrays, std: float, rng: np.random.Generator) -> Arrays:
    """`arrays` plus i.i.d. N(0, std^2) noise on every coordinate (float64)."""
    return [a + rng.normal(0.0, std, size=a.shape) for a in arrays]


@dataclass
class QuantileClipNorm:
    """Adaptive clip norm (Andrew et al. 2021, geometric update).

    After each round: C <- C * exp(-lr * (b - gamma)), where gamma is the target
    unclipped quantile and b the noisy fraction of updates with norm <= C:
    b = (sum_i (1[norm_i <= C] - 1/2) + N(0, count_stddev^2)) / expected_count + 1/2.
    Centring the indicators makes their sensitivity 1/2 (the accounting relies on it);
    dividing by the *sampled* cohort size keeps that true when some clients fail.
    Too many unclipped updates (b > gamma) shrink C, too few grow it: C tracks the
    gamma-quantile of the update norms.
    """

    clip_norm: float
    target_unclipped_quantile: float
    learning_rate: float
    count_stddev: float  # noise std on the count of unclipped updates
    expected_count: int  # the sampled cohort size

    def noisy_unclipped_fraction(
        self, unclipped: int, received: int, rng: np.random.Generator
    ) -> float:
        centred = unclipped - received / 2 + rng.normal(0.0, self.count_stddev)
        return float(centred / self.expected_count + 0.5)

    def update(self, unclipped: int, received: int, rng: np.random.Generator) -> float:
        """Move C after a round; returns the noisy unclipped fraction used."""
        fraction = self.noisy_unclipped_fraction(unclipped, received, rng)
        self.clip_norm *= math.exp(
            -self.learning_rate * (fraction - self.target_unclipped_quantile)
        )
        return fraction
