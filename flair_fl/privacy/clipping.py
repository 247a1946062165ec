"""Adaptive clip norm for central DP (the clipping itself: privacy/clip.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
