"""Seeded cohort sampling: which FLAIR users train in which round.

Samplers are config nodes (`sampler=...`, conf/sampler/): a `_partial_` factory the run
calls with `(user_ids, cohort_size, seed)`. Every draw depends only on (seed, purpose,
round), so a resumed run draws the same users and a sampler keeps no state.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from flair_fl.services.seeds import derive_seed


def repeat_indices(users: list[str]) -> list[int]:
    """For each cohort member, how many times its user came before it in the cohort
    (0 for a first draw): a repeated user trains again with its own client seed."""
    seen: dict[str, int] = {}
    repeats = []
    for user in users:
        repeats.append(seen.get(user, 0))
        seen[user] = repeats[-1] + 1
    return repeats


class Sampler(Protocol):
    """What the round loop asks of a sampler."""

    cohort_size: int

    def sample(self, server_round: int, purpose: str = "train") -> list[str]:
        """The users of round `server_round` (a user may repeat if the sampler allows it)."""
        ...


class CohortSampler:
    """Samples `cohort_size` distinct users for each round (`sampler=without_replacement`).

    Costs O(cohort) per round however large the population.
    """

    def __init__(self, user_ids: list[str], cohort_size: int, seed: int):
        if not 1 <= cohort_size <= len(user_ids):
            raise ValueError(f"cohort_size must be in [1, {len(user_ids)}], got {cohort_size}")
        self.user_ids, self.cohort_size, self.seed = user_ids, cohort_size, seed

    def _rng(self, server_round: int, purpose: str) -> np.random.Generator:
        return np.random.default_rng(derive_seed(self.seed, purpose, server_round))

    def sample(self, server_round: int, purpose: str = "train") -> list[str]:
        rng = self._rng(server_round, purpose)
        picked: set[int] = set()
        n = len(self.user_ids)
        while len(picked) < self.cohort_size:  # rejection sampling: O(cohort) for cohort << n
            picked.update(rng.integers(0, n, size=self.cohort_size - len(picked)).tolist())
        order = sorted(picked)
        rng.shuffle(order)
        return [self.user_ids[i] for i in order]


class WithReplacementSampler(CohortSampler):
    """pfl-research's cohort sampling (`sampler=with_replacement`): each of the
    `cohort_size` members is drawn independently and uniformly from all users, so a user
    can appear more than once in a round (pfl: `get_user_sampler('random', user_ids)`,
    `user_ids[np.random.randint(0, len(user_ids))]` per member). A repeated user trains
    again from the same global model, with its own data order (client seed per repeat).
    """

    def sample(self, server_round: int, purpose: str = "train") -> list[str]:
        draws = self._rng(server_round, purpose).integers(0, len(self.user_ids), self.cohort_size)
        return [self.user_ids[i] for i in draws.tolist()]


class MinSeparationSampler(CohortSampler):
    """Cyclic min-separation sampling (`sampler=min_separation`; `privacy=dp_bmf` uses it).

    The users are split once, by a seeded permutation, into `min_separation` groups of
    near-equal size; round r draws its cohort (without replacement) from group
    (r - 1) mod min_separation only. So a user trains at most once in any `min_separation`
    consecutive rounds, which is what the banded mechanism's sensitivity assumes, and each
    round samples a user of its group at rate cohort / group size.
    """

    def __init__(self, user_ids: list[str], cohort_size: int, seed: int, min_separation: int = 48):
        smallest = len(user_ids) // min_separation
        if not 1 <= cohort_size <= smallest:
            raise ValueError(
                f"min-separation {min_separation} splits {len(user_ids)} users into groups of "
                f"{smallest}: cohort_size must be in [1, {smallest}], got {cohort_size}"
            )
        super().__init__(user_ids, cohort_size, seed)
        order = np.random.default_rng(derive_seed(seed, "min-separation-groups")).permutation(
            len(user_ids)
        )
        self.min_separation = min_separation
        self.groups = [
            CohortSampler([user_ids[i] for i in order[g::min_separation]], cohort_size, seed)
            for g in range(min_separation)
        ]

    def sample(self, server_round: int, purpose: str = "train") -> list[str]:
        group = self.groups[(server_round - 1) % self.min_separation]
        return group.sample(server_round, purpose)
