"""Central DP wrapper: noise level, clipping bound, failed clients, server optimizer, adaptive C.

The wrapper is driven directly with hand-made reply Messages (no simulation), so every
number can be checked against a formula.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    Strategy,
)

from flair_fl.errors import ConfigError
from flair_fl.federated.contract import server_strategy
from flair_fl.privacy import PrivacyContext
from flair_fl.privacy.central import AdaptiveClipping, CentralDP
from flair_fl.privacy.central_stages import CentralDPStages, NoiseSettings, RoundStats
from flair_fl.privacy.clipping import QuantileClipNorm
from tests.fake_grid import FakeGrid, failed, record, reply_content, run_round

Weights = dict[str, np.ndarray]
GLOBAL: Weights = {"a": np.full((3, 2), 0.5, dtype=np.float32), "b": np.zeros(4, np.float32)}
_record = record


def _reply(update: Weights, base: Weights = GLOBAL) -> RecordDict:
    """A client's reply: base weights + update, with our clients' metric keys."""
    return reply_content({k: base[k] + update[k] for k in base})


def _failed() -> Error:
    return failed()


def _fedavg() -> FedAvg:
    return FedAvg(weighted_by_key="uniform-weight")


@dataclass
class _DP:
    """A server strategy and central DP's round stages, run together as the loop does."""

    strategy: Strategy
    stages: CentralDPStages

    @property
    def history(self) -> dict[int, RoundStats]:
        return self.stages.history


def _dp(inner: Strategy, cohort: int, z: float, clip: float, seed: int = 3) -> _DP:
    return _DP(inner, CentralDPStages(NoiseSettings(cohort, z, 1.0, seed), clip))


def _run(
    target: _DP | Strategy,
    replies: list[RecordDict | Error],
    base: Weights = GLOBAL,
    server_round: int = 1,
) -> ArrayRecord | None:
    if isinstance(target, _DP):
        return run_round(
            server_strategy(target.strategy), replies, base, server_round, target.stages
        )
    return run_round(server_strategy(target), replies, base, server_round)


def _aggregate(
    target: _DP | Strategy,
    replies: list[RecordDict | Error],
    base: Weights = GLOBAL,
    server_round: int = 1,
) -> Weights:
    arrays = _run(target, replies, base, server_round)
    assert arrays is not None
    return {k: v.numpy().astype(np.float64) for k, v in arrays.items()}


def _flat(weights: Weights, minus: Weights = GLOBAL) -> np.ndarray:
    return np.concatenate([(weights[k] - minus[k]).ravel() for k in minus])


def _update(norm: float, rng: np.random.Generator, like: Weights = GLOBAL) -> Weights:
    direction = {k: rng.normal(size=v.shape) for k, v in like.items()}
    scale = norm / float(np.linalg.norm(_flat(direction, {k: 0 * v for k, v in like.items()})))
    return {k: (v * scale).astype(np.float32) for k, v in direction.items()}


def test_noise_std_on_the_mean_is_z_c_over_cohort() -> None:
    # Zero updates: what comes out is noise only. 201,000 coordinates give the sample std a
    # relative standard error of 1/sqrt(2 * 201000) = 0.16%; the 1% tolerance is ~6 of them.
    big = {"a": np.zeros((500, 400), np.float32), "b": np.zeros(1000, np.float32)}
    zero = {k: np.zeros_like(v) for k, v in big.items()}
    cohort, z, clip = 4, 1.3, 0.5
    dp = _dp(_fedavg(), cohort, z, clip)

    noise = _flat(_aggregate(dp, [_reply(zero, big) for _ in range(cohort)], big), big)

    expected = z * clip / cohort
    assert np.std(noise) == pytest.approx(expected, rel=0.01)
    assert abs(np.mean(noise)) < 5 * expected / np.sqrt(noise.size)
    assert dp.history[1].noise_std == pytest.approx(expected)
    assert dp.history[1].clipped_fraction == 0.0 and dp.history[1].update_norm_mean == 0.0


def test_clipping_bounds_every_users_contribution_to_c_over_cohort() -> None:
    rng = np.random.default_rng(0)
    clip, cohort = 0.2, 3
    small, large = _update(0.05, rng), _update(40.0, rng)
    others = [_reply(small), _reply(_update(0.1, rng))]

    for z in (0.0, 1.3):  # with noise too: the same seed and round give the same noise
        with_large = _aggregate(_dp(_fedavg(), cohort, z, clip), [*others, _reply(large)])
        without = _aggregate(_dp(_fedavg(), cohort, z, clip), others)
        huger = {k: 1000 * v for k, v in large.items()}
        with_huger = _aggregate(_dp(_fedavg(), cohort, z, clip), [*others, _reply(huger)])

        # One user moves the aggregate by exactly C / cohort, however large its update.
        assert np.linalg.norm(_flat(with_large, without)) == pytest.approx(clip / cohort, rel=1e-4)
        assert np.allclose(_flat(with_huger, without), _flat(with_large, without), atol=1e-6)
    # An update inside the bound passes unscaled: mean of (small, 0.1-update, clipped large).
    dp = _dp(_fedavg(), cohort, 0.0, clip)
    mean = _flat(_aggregate(dp, [_reply(small)]))
    assert np.allclose(mean, _flat(small, {k: 0 * v for k, v in small.items()}) / cohort, atol=1e-7)
    assert dp.history[1].clipped_fraction == 0.0


def test_failed_clients_still_get_noise_and_mean_of_the_sampled_cohort() -> None:
    big = {"a": np.zeros((400, 250), np.float32), "b": np.zeros(10, np.float32)}
    zero = {k: np.zeros_like(v) for k, v in big.items()}
    cohort, z, clip = 4, 0.8, 1.0
    replies = [_reply(zero, big), _failed(), _reply(zero, big), _failed()]

    dp = _dp(_fedavg(), cohort, z, clip)
    noise = _flat(_aggregate(dp, replies, big), big)

    # Two of four replied: the noise std on the mean stays z*C/4 (not z*C/2, which the
    # replies alone would suggest: half the noise the guarantee was computed for).
    assert np.std(noise) == pytest.approx(z * clip / cohort, rel=0.01)
    assert dp.history[1].received == 2
    # And the mean divides by the sampled cohort: two updates u give 2u/4.
    u = _update(0.5, np.random.default_rng(1))
    mean = _flat(_aggregate(_dp(_fedavg(), cohort, 0.0, clip), [_reply(u), _failed(), _reply(u)]))
    assert np.allclose(mean, 2 * _flat(u, {k: 0 * v for k, v in u.items()}) / cohort, atol=1e-7)


def test_all_clients_failed_leaves_the_model_and_records_the_round() -> None:
    dp = _dp(_fedavg(), 3, 1.0, 0.1)

    assert _run(dp, [_failed(), _failed()]) is None
    assert dp.history[1].received == 0


def test_server_optimizer_runs_on_the_noised_mean() -> None:
    rng = np.random.default_rng(2)
    replies = [_reply(_update(n, rng)) for n in (0.05, 0.3, 2.0)]
    kwargs = {"weighted_by_key": "uniform-weight"}
    private_mean = _aggregate(_dp(_fedavg(), 3, 1.1, 0.2), replies)  # global + noised mean

    with_adam = _aggregate(_dp(FedAdam(eta=0.1, **kwargs), 3, 1.1, 0.2), replies)

    reference = FedAdam(eta=0.1, **kwargs)  # Adam fed with that one private aggregate
    expected = _aggregate(reference, [_reply({k: private_mean[k] - GLOBAL[k] for k in GLOBAL})])
    for key in GLOBAL:
        np.testing.assert_allclose(with_adam[key], expected[key], rtol=0, atol=1e-6)
        assert not np.allclose(with_adam[key], private_mean[key])  # Adam did act


def test_noise_is_reproducible_from_seed_and_round() -> None:
    zero = {k: np.zeros_like(v) for k, v in GLOBAL.items()}

    def noise(seed: int, server_round: int) -> np.ndarray:
        dp = _dp(_fedavg(), 2, 1.0, 1.0, seed=seed)
        return _flat(_aggregate(dp, [_reply(zero), _reply(zero)], server_round=server_round))

    assert np.array_equal(noise(5, 1), noise(5, 1))
    assert not np.allclose(noise(5, 1), noise(5, 2))
    assert not np.allclose(noise(5, 1), noise(6, 1))


def test_example_weighting_is_refused_naming_aggregation() -> None:
    context = PrivacyContext(10, 100, 5, 0, weighted_by_key="num-examples")

    with pytest.raises(ConfigError, match="aggregation"):
        CentralDP(noise_multiplier=1.0).round_stages(context)


def test_client_state_arrays_are_refused() -> None:
    dp = _dp(_fedavg(), 2, 1.0, 1.0)
    extra = reply_content(GLOBAL, **{"scaffold.dc.a": np.zeros(2, np.float32)})

    with pytest.raises(ValueError, match="SCAFFOLD"):
        _run(dp, [extra])


def test_flower_fixed_clipping_wrapper_skips_rounds_with_a_failed_client() -> None:
    # Why we do not use Flower's wrapper: one failed client and the round is dropped.
    flower = DifferentialPrivacyServerSideFixedClipping(_fedavg(), 1.0, 0.1, 2)
    sent = list(flower.configure_train(1, _record(GLOBAL), ConfigRecord(), _grid()))
    ok = Message(_reply(_update(0.05, np.random.default_rng(3))), reply_to=sent[0])

    assert flower.aggregate_train(1, [ok, Message(_failed(), reply_to=sent[0])]) == (None, None)


def test_resumed_run_continues_with_the_adapted_clip_norm_and_same_accounting() -> None:
    context = PrivacyContext(2, 20, 10, seed=4, weighted_by_key="uniform-weight")
    settings = {"noise_multiplier": 1.0, "adaptive": AdaptiveClipping(0.1, 0.2, 5.0)}
    first = CentralDP(**settings)  # type: ignore[arg-type]
    stages = first.round_stages(context)
    rng = np.random.default_rng(5)
    _aggregate(_DP(_fedavg(), stages), [_reply(_update(1.0, rng)), _reply(_update(2.0, rng))])

    resumed = CentralDP(**settings)  # type: ignore[arg-type]
    resumed.round_stages(context)
    resumed.load_state_dict(first.state_dict())

    assert first.stages is not None and resumed.stages is not None
    assert resumed.stages.clip_norm == first.stages.clip_norm != 0.1
    assert resumed.round_metrics(1) == first.round_metrics(1)
    assert resumed.epsilon_after(5) == first.epsilon_after(5)
    changed = CentralDP(noise_multiplier=2.0, adaptive=AdaptiveClipping(0.1, 0.2, 5.0))
    changed.round_stages(context)
    with pytest.raises(ConfigError, match="resume"):
        changed.load_state_dict(first.state_dict())


# Adaptive clipping: update norms ~ LogNormal(0, 1), whose 0.1 quantile is exp(-1.2816).
QUANTILE_0_1 = float(np.exp(-1.2815516))
COHORT = 20


def _grid() -> FakeGrid:
    return FakeGrid(lambda message: None)  # configure_train only samples nodes


def _flower_round(strategy: Strategy) -> Callable[[int, list[RecordDict], Weights], None]:
    """A round of a Flower strategy (or wrapper) through its own API, on given replies."""

    def run(server_round: int, replies: list[RecordDict], base: Weights) -> None:
        sent = list(strategy.configure_train(server_round, _record(base), ConfigRecord(), _grid()))
        strategy.aggregate_train(server_round, [Message(r, reply_to=sent[0]) for r in replies])

    return run


def _lognormal_rounds(
    run: Callable[[int, list[RecordDict], Weights], object],
    clip_of: Callable[[], float],
    rounds: int,
) -> tuple[list[float], list[float]]:
    """Run rounds of COHORT updates; return C before each round and the unclipped shares."""
    rng = np.random.default_rng(11)
    zero = {"w": np.zeros(4, np.float32)}
    clips, unclipped = [], []
    for server_round in range(1, rounds + 1):
        norms = rng.lognormal(0.0, 1.0, COHORT)
        clip = float(clip_of())
        replies = [_reply(_update(n, rng, zero), zero) for n in norms]
        run(server_round, list(replies), zero)
        clips.append(clip)
        unclipped.append(float(np.mean(norms <= clip)))
    return clips, unclipped


def test_adaptive_clip_norm_converges_to_the_requested_unclipped_quantile() -> None:
    # Andrew et al.'s setting: start C=0.1, lr 0.2, count noise std cohort/20 (0.05 on the
    # fraction). C needs ~70 rounds to climb to the quantile; after that log C fluctuates
    # with a std of ~7% (count noise + sampling of 20 norms). Tolerances: 12% on the median
    # C of the last 80 rounds, 0.03 on the mean share of unclipped updates.
    estimator = QuantileClipNorm(0.1, 0.1, 0.2, COHORT / 20, COHORT)
    dp = _DP(_fedavg(), CentralDPStages(NoiseSettings(COHORT, 1.0, 1.0, 0), 0.1, estimator))

    def run(server_round: int, replies: list[RecordDict], base: Weights) -> None:
        _run(dp, list(replies), base, server_round)

    clips, unclipped = _lognormal_rounds(run, lambda: dp.stages.clip_norm, rounds=160)

    assert np.median(clips[-80:]) == pytest.approx(QUANTILE_0_1, rel=0.12)
    assert np.mean(unclipped[-80:]) == pytest.approx(0.1, abs=0.03)
    assert clips[0] == 0.1 and dp.history[1].clip_norm == 0.1  # round 1 clips with C0


@pytest.mark.parametrize("initial", [0.1, 10.0])
def test_flower_adaptive_wrapper_does_not_reach_the_requested_quantile(initial: float) -> None:
    # Flower 1.41's DifferentialPrivacyServerSideAdaptiveClipping updates
    # C <- C * exp(-lr * (clipped_fraction - target_clipped_quantile)): more clipping than
    # wanted shrinks C further, so C runs away from the target instead of tracking it.
    # Asking for 10% unclipped (= 90% clipped), without count noise, from C=0.1 or C=10,
    # C moves *away* from the 0.1 quantile. If this starts failing, Flower fixed its update
    # and its wrapper could be reconsidered (it would still noise after the server step).
    flower = DifferentialPrivacyServerSideAdaptiveClipping(
        _fedavg(), 0.0, COHORT, initial, target_clipped_quantile=0.9, clip_norm_lr=0.2
    )

    clips, unclipped = _lognormal_rounds(
        _flower_round(flower), lambda: flower.clipping_norm, rounds=60
    )

    distance = [abs(np.log(c / QUANTILE_0_1)) for c in clips]
    assert distance[-1] > distance[0] + 0.5
    assert abs(np.mean(unclipped[-20:]) - 0.1) > 0.08
