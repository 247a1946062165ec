"""Seeded cohort sampling: which FLAIR users train in which round."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from any parts (stable across processes and Python runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class CohortSampler:
    """Samples `cohort_size` users without replacement for each round.

    The draw for round r depends only on (seed, r), so a resumed run draws the same users,
    and costs O(cohort) per round however large the population.
    """

    def __init__(self, user_ids: list[str], cohort_size: int, seed: int):
        if not 1 <= cohort_size <= len(user_ids):
            raise ValueError(f"cohort_size must be in [1, {len(user_ids)}], got {cohort_size}")
        self.user_ids, self.cohort_size, self.seed = user_ids, cohort_size, seed

    def sample(self, server_round: int, purpose: str = "train") -> list[str]:
        rng = np.random.default_rng(derive_seed(self.seed, purpose, server_round))
        picked: set[int] = set()
        n = len(self.user_ids)
        while len(picked) < self.cohort_size:  # rejection sampling: O(cohort) for cohort << n
            picked.update(rng.integers(0, n, size=self.cohort_size - len(picked)).tolist())
        order = sorted(picked)
        rng.shuffle(order)
        return [self.user_ids[i] for i in order]
