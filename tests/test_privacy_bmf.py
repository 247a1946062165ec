"""Banded matrix factorization: C, its sensitivity, the correlated noise, sampler, accounting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAvg
from hydra.utils import instantiate

from flair_fl.errors import ConfigError
from flair_fl.federated.sampling import MinSeparationSampler
from flair_fl.modes.federated import run_experiment
from flair_fl.privacy import PrivacyContext
from flair_fl.privacy.accounting import EpsilonCurve, noise_multiplier_for
from flair_fl.privacy.bmf import BandedMFDP, BandedNoise, bsr_coefficients, strategy_matrix
from flair_fl.privacy.bmf_factorization import sqrt_band
from flair_fl.privacy.calibrate import main
from flair_fl.privacy.central_stages import NoiseSettings
from tests.helpers import compose_config
from tests.test_privacy_central import _DP, _aggregate, _reply

S = math.sqrt(1.25)  # norm of the 2-band square root's column (1, 1/2)
# 4 rounds, 2 bands, by hand: C = (I + S/2) / sqrt(1.25) with S the shift down, so
# C^-1 = sqrt(1.25) (I - S/2 + S^2/4 - S^3/8).
C_4_2 = np.array([[1, 0, 0, 0], [0.5, 1, 0, 0], [0, 0.5, 1, 0], [0, 0, 0.5, 1]]) / S
C_INV_4_2 = S * np.array(
    [[1, 0, 0, 0], [-0.5, 1, 0, 0], [0.25, -0.5, 1, 0], [-0.125, 0.25, -0.5, 1]]
)


def _context(cohort: int, population: int, rounds: int) -> PrivacyContext:
    return PrivacyContext(cohort, population, rounds, seed=0, weighted_by_key="uniform-weight")


def _fedavg() -> FedAvg:
    return FedAvg(weighted_by_key="uniform-weight", min_available_nodes=1, min_train_nodes=1)


def test_strategy_matrix_is_the_hand_computed_banded_square_root() -> None:
    assert bsr_coefficients(3) == pytest.approx(np.array([1, 0.5, 0.375]) / math.sqrt(1.390625))
    np.testing.assert_allclose(strategy_matrix(4, 2), C_4_2, atol=1e-15)
    np.testing.assert_allclose(np.linalg.inv(strategy_matrix(4, 2)), C_INV_4_2, atol=1e-12)


def test_sensitivity_under_min_separation_is_one_per_participation() -> None:
    c = strategy_matrix(4, 2)

    column_norms = np.linalg.norm(c, axis=0)
    separated = [(0, 2), (0, 3), (1, 3)]  # every pattern with participations >= 2 apart

    # Columns 0-2 are (1, 1/2)/sqrt(1.25): norm 1; the last one 1/sqrt(1.25) = 0.894.
    np.testing.assert_allclose(column_norms, [1, 1, 1, 1 / S], atol=1e-12)
    squared = {p: np.linalg.norm(c[:, p[0]] + c[:, p[1]]) ** 2 for p in separated}
    # Disjoint supports: the squared norms add, 1 + 1 or 1 + 0.8 with the last round.
    assert squared == pytest.approx({(0, 2): 2.0, (0, 3): 1.8, (1, 3): 1.8}, abs=1e-12)
    assert max(squared.values()) == pytest.approx(2.0)  # k = 2 participations x 1
    # Adjacent participations would overlap: 1 + 1 + 2 * (1/2) / 1.25 = 2.8 > 2.
    assert np.linalg.norm(c[:, 0] + c[:, 1]) ** 2 == pytest.approx(2.8)


def test_banded_noise_is_c_inverse_times_the_independent_draws() -> None:
    noise, draws = BandedNoise(sqrt_band(4, 2)), np.eye(4)  # round t's draw: coordinate t only

    outputs = np.stack([noise.step(draws[t]) for t in range(4)])

    np.testing.assert_allclose(outputs, C_INV_4_2, atol=1e-6)  # float32 history


def test_noise_on_the_model_has_covariance_sigma2_c_inv_c_inv_t() -> None:
    # Prepare: 4 rounds of 2 zero updates through the real wrapper, 50,000 coordinates.
    dims = 50_000
    base = {"w": np.zeros(dims, dtype=np.float32)}
    dp = BandedMFDP(
        min_separation=2,
        bands=2,
        factorization="sqrt",
        noise_multiplier=1.5,
        clip_norm=0.2,
        secure_noise=False,
    )
    strategy = _DP(_fedavg(), dp.round_stages(_context(2, 8, 4)))
    noise = []
    weights = base
    for server_round in range(1, 5):
        replies = [_reply({"w": np.zeros(dims, np.float32)}, weights) for _ in range(2)]
        new = _aggregate(strategy, replies, weights, server_round)
        noise.append((new["w"] - weights["w"].astype(np.float64)) * 2)  # times the cohort
        weights = {"w": new["w"].astype(np.float32)}
    rounds_noise = np.stack(noise)

    sigma = 1.5 * 0.2
    expected = sigma**2 * C_INV_4_2 @ C_INV_4_2.T
    # Exactly C^-1 times the seeded draws ...
    draws = np.stack(
        [NoiseSettings(2, 1.5, seed=0).generator(r).normal(0, sigma, dims) for r in range(1, 5)]
    )
    np.testing.assert_allclose(rounds_noise, C_INV_4_2 @ draws, rtol=0, atol=2e-5)
    # ... so its covariance across rounds is sigma^2 C^-1 C^-T (to sampling error).
    np.testing.assert_allclose(np.cov(rounds_noise), expected, atol=0.02 * sigma**2 * 2)


def test_min_separation_sampler_keeps_users_apart_and_partitions_them() -> None:
    users = [f"u{i}" for i in range(40)]
    sampler = MinSeparationSampler(users, cohort_size=3, seed=1, min_separation=5)

    rounds = [sampler.sample(r) for r in range(1, 31)]

    last: dict[str, int] = {}
    for r, cohort in enumerate(rounds, start=1):
        assert len(set(cohort)) == 3
        for user in cohort:
            assert r - last.get(user, -100) >= 5, (user, r)
            last[user] = r
    assert sorted(u for g in sampler.groups for u in g.user_ids) == sorted(users)
    assert rounds == [MinSeparationSampler(users, 3, 1, 5).sample(r) for r in range(1, 31)]


def test_accounting_is_ceil_t_over_b_participations_at_rate_b_q() -> None:
    dp = BandedMFDP(min_separation=4, epsilon=3.0, delta=1e-5, secure_noise=False)

    dp.round_stages(_context(2, 80, 30))

    z = noise_multiplier_for(3.0, 1e-5, 4 * 2 / 80, 8, "rdp")  # ceil(30 / 4) = 8
    assert dp.calibration is not None and dp.calibration.noise_multiplier == z
    assert dp.epsilon_after(30) == EpsilonCurve(z, 0.1, 1e-5, "rdp")(8)
    assert dp.epsilon_after(5) == EpsilonCurve(z, 0.1, 1e-5, "rdp")(2)
    described = dp.describe()
    assert described["participations_per_user"] == 8
    assert described["q_per_participation"] == pytest.approx(0.1)
    assert described["mechanism"] == "central-dp-banded-mf" and described["bands"] == 3


def test_calibrate_with_min_separation_prints_the_runs_z(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dp = BandedMFDP(min_separation=4, epsilon=3.0, delta=1e-5)
    dp.round_stages(_context(2, 80, 30))

    main(
        [
            *("calibrate", "--epsilon", "3", "--delta", "1e-5", "--sampling-rate", "0.025"),
            *("--steps", "30", "--min-separation", "4"),
        ]
    )

    out = capsys.readouterr().out.splitlines()
    assert dp.calibration is not None
    assert out == [
        f"noise_multiplier={dp.calibration.noise_multiplier!r}",
        f"epsilon={dp.epsilon_after(30)!r}",
    ]


def test_resumed_noise_continues_the_correlation(tmp_path: Path) -> None:
    full = BandedNoise(sqrt_band(6, 3))
    draws = np.random.default_rng(0).normal(size=(6, 5))
    expected = [full.step(d) for d in draws]

    first = BandedNoise(sqrt_band(6, 3))
    for d in draws[:3]:
        first.step(d)
    torch.save({"privacy": {"banded_noise": first.state_dict()}}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)  # as checkpoints load
    resumed = BandedNoise(sqrt_band(6, 3))
    resumed.load_state_dict(saved["privacy"]["banded_noise"])

    np.testing.assert_array_equal([resumed.step(d) for d in draws[3:]], expected[3:])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"min_separation": 4, "bands": 5}, "privacy.bands"),
        ({"min_separation": 1}, "privacy.min_separation"),
        ({"adaptive": object()}, "privacy.adaptive"),
        ({"factorization": "cholesky"}, "privacy.factorization"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        BandedMFDP(**kwargs)  # type: ignore[arg-type]


def test_groups_smaller_than_the_cohort_are_refused() -> None:
    dp = BandedMFDP(min_separation=48, noise_multiplier=1.0)

    with pytest.raises(ConfigError, match=r"privacy\.min_separation=48"):
        dp.round_stages(_context(3, 32, 10))


@pytest.mark.slow  # one real run through the Flower simulation
def test_dp_bmf_run_samples_min_separated_cohorts_and_records_the_mechanism(
    run_overrides: list[str], tmp_path: Path
) -> None:
    cfg = compose_config(
        [
            *run_overrides,
            "privacy=dp_bmf",
            "privacy.min_separation=4",
            "privacy.noise_multiplier=1.0",
            "num_rounds=3",
            "eval_every=0",
            "eval.test_at_end=false",
        ]
    )
    assert isinstance(instantiate(cfg.privacy), BandedMFDP)

    summary = run_experiment(cfg, tmp_path)

    described = json.loads((tmp_path / "privacy.json").read_text())
    assert summary["rounds"] == 3 and described["mechanism"] == "central-dp-banded-mf"
    assert described["min_separation"] == 4 and described["participations_per_user"] == 1
    assert np.isfinite(summary["final_val_loss"])


def test_min_separation_is_a_sampler_config_node_and_dp_bmf_refuses_with_replacement() -> None:
    from flair_fl.errors import ConfigError as Refused
    from flair_fl.modes.build import make_sampler

    cfg = compose_config(["sampler=min_separation", "sampler.min_separation=4", "cohort_size=2"])
    users = [f"u{i}" for i in range(20)]

    sampler = instantiate(cfg.sampler)(users, 2, 0)
    bmf = instantiate(compose_config(["privacy=dp_bmf", "privacy.min_separation=4"]).privacy)
    with_replacement = compose_config(
        ["privacy=dp_bmf", "privacy.min_separation=4", "sampler=with_replacement", "cohort_size=2"]
    )

    assert isinstance(sampler, MinSeparationSampler) and sampler.min_separation == 4
    assert isinstance(make_sampler(cfg, users, bmf), MinSeparationSampler)
    with pytest.raises(Refused, match="sampler=with_replacement"):
        make_sampler(with_replacement, users, instantiate(with_replacement.privacy))
