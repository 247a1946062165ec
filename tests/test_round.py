"""The round loop (federated/round.py) on a fake Grid: fold, skip, divergence, failure
counting, timeouts, stop requests, payload and the privacy stages, in milliseconds.

The clients are a Python function (tests/fake_grid.py says why); everything else is the
real loop, strategies, reductions and privacy stages."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from flair_fl.federated.contract import ServerStrategy, server_strategy
from flair_fl.federated.round import LoopOutcome, RoundPlan, run_rounds
from flair_fl.federated.sampling import CohortSampler
from flair_fl.privacy import PrivacyContext
from flair_fl.privacy.central_stages import CentralDPStages, NoiseSettings
from flair_fl.privacy.local import LocalDPSGD
from flair_fl.privacy.stages import PlainMean, RoundPrivacy
from flair_fl.protocol import CLIENT_TIMEOUT
from flair_fl.services import stopping
from tests.fake_grid import FakeGrid, failed, numpy_of, record, reply_content

X = {"w": np.array([1.0, -2.0, 0.5], dtype=np.float32)}
USERS = ["a", "b", "c", "d"]
STEP = {"a": np.array([0.1, 0.0, 0.0]), "b": np.array([0.0, 0.2, 0.0])}
STEP |= {"c": np.array([0.0, 0.0, -0.3]), "d": np.array([0.4, 0.4, 0.4])}


@pytest.fixture(autouse=True)
def _fresh_stop_state() -> Iterator[None]:
    with stopping.handling():  # a stop requested by one test must not stop the next
        yield


def _client(behaviour: dict[str, str] | None = None) -> Callable[[Message], Any]:
    """Each user replies with the weights it got plus its STEP; `behaviour` makes some
    raise, time out (reported by the pool or never answering) or send NaN."""
    behaviour = behaviour or {}

    def client(message: Message) -> RecordDict | Error | None:
        config = message.content.config_records["config"]
        user = str(config["user-id"])
        kind = behaviour.get(user, "ok")
        if kind == "raise":
            return failed("Traceback ...\nRuntimeError: boom")
        if kind == "pool-timeout":  # as the actor pool reports it (flower_patch.py)
            return Error(code=CLIENT_TIMEOUT, reason="no words to match: the code says it")
        if kind == "silent":
            return None
        sent = numpy_of(message.content.array_records["arrays"])
        weights = {"w": sent["w"] + (np.nan if kind == "nan" else STEP[user])}
        return reply_content(weights, user=user, loss=0.25)

    return client


def _run(
    client: Callable[[Message], Any],
    strategy: ServerStrategy | None = None,
    privacy: RoundPrivacy | None = None,
    rounds: int = 1,
    **plan: Any,
) -> tuple[LoopOutcome, list[dict[str, Any]], FakeGrid]:
    grid = FakeGrid(client, num_nodes=2)
    strategy = strategy or server_strategy(FedAvg(weighted_by_key="uniform-weight"))
    seen: list[dict[str, Any]] = []

    def after_round(server_round: int, arrays: ArrayRecord, metrics: dict[str, Any]) -> bool:
        seen.append({"round": server_round, **metrics})
        return False

    settings = {"round_timeout": 0.2, "poll_interval": 0.001, "num_supernodes": 2, **plan}
    outcome = LoopOutcome(arrays=record(X))
    run_rounds(
        grid,
        strategy,
        privacy or PlainMean(),
        record(X),
        RoundPlan(num_rounds=rounds, sampler=CohortSampler(USERS, 4, seed=0), **settings),
        after_round,
        None,
        outcome,
    )
    return outcome, seen, grid


def _weights(outcome: LoopOutcome) -> np.ndarray:
    assert outcome.arrays is not None
    return numpy_of(outcome.arrays)["w"]


def test_rounds_fold_the_mean_and_spread_users_over_the_nodes() -> None:
    # Execute: two rounds of FedProx (FedAvg's step, mu in the payload)
    strategy = server_strategy(FedProx(proximal_mu=0.5, weighted_by_key="uniform-weight"))
    outcome, seen, grid = _run(_client(), strategy, rounds=2)

    # Assert: each round moves the model by the mean step of the four users
    mean_step = np.mean([STEP[u] for u in USERS], axis=0)
    np.testing.assert_allclose(_weights(outcome), X["w"] + 2 * mean_step, atol=1e-6)
    assert outcome.rounds_done == 2 and outcome.rounds_run == 2 and not outcome.diverged
    assert [m["clients_ok"] for m in seen] == [4, 4] and seen[0]["train_loss"] == 0.25
    assert seen[0]["clients_failed"] == 0 and seen[0]["round_skipped"] == 0
    configs = [m.content.config_records["config"] for m in grid.pushed]
    assert {c["proximal-mu"] for c in configs} == {0.5}
    assert [c["server-round"] for c in configs] == [1] * 4 + [2] * 4
    assert [m.metadata.dst_node_id for m in grid.pushed[:4]] == [1, 2, 1, 2]


def test_failures_are_counted_by_kind_and_the_round_goes_on() -> None:
    behaviour = {"a": "raise", "b": "pool-timeout", "c": "silent", "d": "nan"}
    good = {"a": "ok", "b": "pool-timeout", "c": "silent", "d": "nan"}

    outcome, seen, _ = _run(_client(behaviour | good))

    assert seen[0]["clients_ok"] == 1 and seen[0]["clients_failed"] == 3
    assert (seen[0]["clients_timeout"], seen[0]["clients_rejected"]) == (2, 1)
    assert seen[0]["clients_raised"] == 0 and outcome.failures["timeout"] == 2
    np.testing.assert_allclose(_weights(outcome), X["w"] + STEP["a"], atol=1e-6)
    outcome, seen, _ = _run(_client(behaviour))
    assert seen[0]["clients_raised"] == 1 and outcome.failures["raised"] == 1


def test_too_few_updates_skip_the_round_and_keep_the_model() -> None:
    outcome, seen, _ = _run(_client({"a": "raise", "b": "raise", "c": "raise"}), min_replies=2)

    assert seen[0]["round_skipped"] == 1 and outcome.rounds_skipped == 1
    np.testing.assert_array_equal(_weights(outcome), X["w"])
    assert not outcome.diverged


def test_all_updates_non_finite_stop_the_run_as_diverged() -> None:
    outcome, seen, _ = _run(_client(dict.fromkeys(USERS, "nan")), rounds=3)

    assert outcome.diverged and len(seen) == 1  # no round after the divergence
    assert outcome.stop_reason is not None and "diverged in round 1" in outcome.stop_reason
    np.testing.assert_array_equal(_weights(outcome), X["w"])


def test_should_stop_ends_the_run_before_the_round() -> None:
    outcome, seen, _ = _run(_client(), rounds=3, should_stop=lambda r: "budget" if r == 2 else None)

    assert outcome.rounds_done == 1 and outcome.stop_reason == "budget" and len(seen) == 1


def test_a_stop_request_abandons_the_round_in_progress() -> None:
    def client(message: Message) -> RecordDict | Error | None:
        if not stopping.requested():  # a second request would exit at once
            stopping.request(signal.SIGTERM)  # as a scheduler would, while the round runs
        return _client()(message)

    outcome, seen, _ = _run(client, rounds=2)

    assert outcome.rounds_done == 0 and seen == [] and outcome.rounds_run == 0
    np.testing.assert_array_equal(_weights(outcome), X["w"])


def test_central_dp_clips_each_update_and_divides_by_the_sampled_cohort() -> None:
    # No noise (z = 0): the mean is sum(clipped updates) / 4 sampled users, of whom one failed.
    stages = CentralDPStages(NoiseSettings(4, 0.0, 1.0, seed=0), clip_norm=0.25)

    outcome, _, _ = _run(_client({"b": "raise"}), privacy=stages)

    big = STEP["d"] * 0.25 / np.linalg.norm(STEP["d"])  # norm 0.69 clipped to 0.25
    c = STEP["c"] * 0.25 / 0.3
    expected = X["w"] + (STEP["a"] + c + big) / 4
    np.testing.assert_allclose(_weights(outcome), expected, atol=1e-6)
    assert stages.history[1].received == 3 and stages.history[1].clipped_fraction == 2 / 3


def test_dp_sgd_ledger_records_every_accepted_user_after_the_round() -> None:
    privacy = LocalDPSGD(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=2)
    stages = privacy.round_stages(PrivacyContext(4, 4, 1, 0, "uniform-weight"))

    _run(_client({"c": "raise"}), privacy=stages)

    assert sorted(privacy.ledger.user_steps) == ["a", "b", "d"]
    assert privacy.round_worst[1] > 0


def test_federated_evaluation_gets_the_replies() -> None:
    got: list[tuple[int, int]] = []

    def client(message: Message) -> RecordDict | Error | None:
        if message.metadata.message_type == "evaluate":
            return RecordDict({"metrics": MetricRecord({"eval-loss": 1.0})})
        return _client()(message)

    grid = FakeGrid(client)
    outcome = LoopOutcome()
    plan = RoundPlan(
        num_rounds=2,
        sampler=CohortSampler(USERS, 4, seed=0),
        fed_eval_sampler=CohortSampler(["v1", "v2"], 2, seed=0),
        fed_eval_every=2,
        round_timeout=0.2,
    )

    def on_fed_eval(server_round: int, replies: list[Message]) -> dict[str, Any]:
        got.append((server_round, len(replies)))
        return {"fed_val_loss": 1.0}

    run_rounds(
        grid,
        server_strategy(FedAvg(weighted_by_key="uniform-weight")),
        PlainMean(),
        record(X),
        plan,
        lambda r, a, m: bool(got) and m["fed_val_loss"] != 1.0,
        on_fed_eval,
        outcome,
    )
    assert got == [(2, 2)] and outcome.rounds_done == 2
    evaluate = [m for m in grid.pushed if m.metadata.message_type == "evaluate"]
    assert [m.content.config_records["config"]["split"] for m in evaluate] == ["val", "val"]
    assert isinstance(evaluate[0].content.config_records["config"], ConfigRecord)


@pytest.mark.parametrize("weighting", ["uniform-weight", "num-examples"])
def test_the_mean_is_weighted_by_the_strategys_key(weighting: str) -> None:
    sizes = {"a": 1, "b": 2, "c": 3, "d": 4}

    def client(message: Message) -> RecordDict | Error | None:
        user = str(message.content.config_records["config"]["user-id"])
        sent = numpy_of(message.content.array_records["arrays"])
        return reply_content({"w": sent["w"] + STEP[user]}, user=user, num_examples=sizes[user])

    strategy = server_strategy(FedAvg(weighted_by_key=weighting))
    outcome, seen, _ = _run(client, strategy)

    weights = sizes if weighting == "num-examples" else dict.fromkeys(USERS, 1)
    total = sum(weights.values())
    mean_step = sum(weights[u] * STEP[u] for u in USERS) / total
    np.testing.assert_allclose(_weights(outcome), X["w"] + mean_step, atol=1e-6)
    assert seen[0]["train_images"] == 10
