"""Accounting for banded matrix factorization under cyclic min-separation sampling.

Choquette-Choo et al., "(Amplified) Banded Matrix Factorization" (2023), Thm. 4: split
the population into b = min_separation groups and let round r sample only from group
r mod b. With a lower-triangular strategy matrix C of at most b bands whose columns have
unit norm, a user's participations (rounds >= b apart) touch disjoint rows of C, and the
mechanism is as private as ceil(T / b) compositions of the subsampled Gaussian mechanism
with the same noise multiplier, each sampling from one group: rate b * cohort / population.
"""

from __future__ import annotations

import math


def participation(sample_rate: float, rounds: int, min_separation: int) -> tuple[float, int]:
    """(per-participation sampling rate, most participations per user) over `rounds`."""
    rate = sample_rate * min_separation
    if rate > 1.0:
        raise ValueError(
            f"each of the {min_separation} groups must hold at least a cohort: sampling rate "
            f"{sample_rate:.4g} x {min_separation} = {rate:.4g} > 1"
        )
    return rate, math.ceil(rounds / min_separation)
