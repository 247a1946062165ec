"""Cohort samplers: without replacement (default) and pfl-research's with replacement."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from flair_fl.federated.sampling import CohortSampler, WithReplacementSampler, repeat_indices
from flair_fl.modes.build import make_sampler
from tests.helpers import compose_config

USERS = [f"u{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("option", "kind"),
    [("without_replacement", CohortSampler), ("with_replacement", WithReplacementSampler)],
)
def test_sampler_group_builds_the_configured_sampler(option: str, kind: type) -> None:
    cfg = compose_config([f"sampler={option}", "cohort_size=4"])

    sampler = make_sampler(cfg, USERS)

    assert type(sampler) is kind
    assert (sampler.cohort_size, sampler.seed) == (4, cfg.seed)
    assert sampler.sample(3) == make_sampler(cfg, USERS).sample(3)  # seeded by (seed, round)


def test_with_replacement_draws_each_member_independently_and_uniformly() -> None:
    # Prepare: 5 users, cohort 5. Independent uniform members give a cohort with a
    # repeated user with probability 1 - 5!/5^5 = 0.9616, and every user 1/5 of all draws.
    sampler, rounds = WithReplacementSampler(USERS, 5, seed=3), 4000

    # Execute
    cohorts = [sampler.sample(r) for r in range(1, rounds + 1)]

    # Assert
    repeated = np.mean([len(set(c)) < 5 for c in cohorts])
    assert repeated == pytest.approx(1 - 120 / 5**5, abs=0.015)  # ~5 sigma
    counts = Counter(u for c in cohorts for u in c)
    assert all(abs(counts[u] / (5 * rounds) - 0.2) < 0.01 for u in USERS)
    same_first_two = np.mean([c[0] == c[1] for c in cohorts])  # independence across members
    assert same_first_two == pytest.approx(0.2, abs=0.02)
    without = CohortSampler(USERS, 5, seed=3)
    assert all(sorted(without.sample(r)) == USERS for r in range(1, 50))


def test_a_repeated_user_gets_a_repeat_index_for_its_own_client_seed() -> None:
    assert repeat_indices(["a", "b", "a", "a", "c", "b"]) == [0, 0, 1, 2, 0, 1]
    assert repeat_indices(USERS) == [0] * 5


@pytest.mark.parametrize(("privacy", "warned"), [("dp", True), ("dp_sgd", False), ("none", False)])
def test_with_replacement_under_central_dp_warns_that_epsilon_does_not_cover_it(
    privacy: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from hydra.utils import instantiate

    cfg = compose_config(
        [f"privacy={privacy}", "sampler=with_replacement", "cohort_size=2", "num_rounds=3"]
    )

    make_sampler(cfg, [f"u{i}" for i in range(50)], instantiate(cfg.privacy))

    says = [r.getMessage() for r in caplog.records if "contributes twice" in r.getMessage()]
    assert bool(says) is warned, says
