"""Server strategies against numbers worked out by hand (or by an independent formula)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from flair_fl.algorithms.fedopt import ServerOptimizer
from flair_fl.algorithms.fedprox import AdaFedProx
from flair_fl.algorithms.scaffold import SCAFFOLD_C_PREFIX, SCAFFOLD_DC_PREFIX, Scaffold
from flair_fl.errors import ConfigError
from flair_fl.federated.contract import ServerStrategy, server_strategy
from flair_fl.federated.schedule import ScheduledServerLR, ServerLRSchedule
from tests.fake_grid import record, reply_content, run_round

X = {"w": np.array([1.0, -2.0, 0.5], dtype=np.float32)}
CLIENTS = [np.array([0.8, -1.5, 0.5]), np.array([1.1, -2.5, 0.0]), np.array([0.9, -2.0, 1.0])]


def _round(
    strategy: object,
    server_round: int = 1,
    x: dict[str, np.ndarray] = X,
    clients: list[np.ndarray] = CLIENTS,
) -> dict[str, np.ndarray]:
    contract = strategy if isinstance(strategy, ServerStrategy) else server_strategy(strategy)
    new = run_round(contract, [reply_content({"w": c}) for c in clients], x, server_round)
    assert new is not None
    return {k: v.numpy() for k, v in new.items()}


def _kwargs(key: str = "uniform-weight") -> dict[str, object]:
    return {"weighted_by_key": key}


def test_fedavg_uniform_and_example_weighting() -> None:
    uniform = _round(FedAvg(**_kwargs()))["w"]
    assert uniform == pytest.approx(np.mean(CLIENTS, axis=0), abs=1e-6)

    strategy = server_strategy(FedAvg(**_kwargs("num-examples")))
    replies = [
        reply_content({"w": c}, num_examples=n) for c, n in zip(CLIENTS, (1, 2, 7), strict=True)
    ]
    weighted = run_round(strategy, replies, X)
    assert weighted is not None
    expected = (CLIENTS[0] * 1 + CLIENTS[1] * 2 + CLIENTS[2] * 7) / 10
    assert weighted["w"].numpy() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("robust", [FedMedian, FedTrimmedAvg, Krum])
def test_non_mean_flower_strategies_are_refused_in_one_line(robust: type) -> None:
    # The loop folds every update into a mean: a median would silently become FedAvg.
    with pytest.raises(ConfigError, match=rf"{robust.__name__} does not aggregate a mean") as err:
        server_strategy(robust())
    assert "\n" not in str(err.value)


def test_payload_and_server_lr_through_the_contract() -> None:
    prox = server_strategy(FedProx(proximal_mu=0.3))
    payload, config = prox.payload(4, record(X), {"seed": 1})
    assert config["proximal-mu"] == 0.3 and config["server-round"] == 4
    assert np.array_equal(payload["w"].numpy(), X["w"])
    assert prox.server_lr is None and prox.state_dict() == {}
    ada = AdaFedProx(proximal_mu=0.0)
    ada.proximal_mu = 0.2  # as AdaptiveMu sets it between rounds
    assert ada.payload(1, record(X), {})[1] == {"proximal-mu": 0.2}
    avgm = FedAvgM(server_learning_rate=1.0, server_momentum=0.0)
    contract = server_strategy(avgm)
    contract.server_lr = 0.5
    assert avgm.server_learning_rate == 0.5 and avgm.server_opt  # FedAvgM steps again


def test_fedadam_is_torch_adam_on_the_pseudo_gradient_by_hand() -> None:
    strategy = ServerOptimizer(
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=0.01),
        lr=0.1,
        **_kwargs(),
    )
    x = X["w"].astype(np.float64)
    m = v = np.zeros(3)
    for t in (1, 2):  # two rounds: the moments carry over
        new = _round(strategy, t, {"w": x.astype(np.float32)})["w"]
        g = x - np.mean(CLIENTS, axis=0)  # pseudo-gradient
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g**2
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.99**t)
        x = x - 0.1 * m_hat / (np.sqrt(v_hat) + 0.01)
        assert new == pytest.approx(x, abs=1e-5)


def test_flower_fedyogi_fedadagrad_fedavgm_one_round_by_hand() -> None:
    delta = np.mean(CLIENTS, axis=0) - X["w"]
    yogi = _round(FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3, **_kwargs()))["w"]
    m = 0.1 * delta
    v = -(0.01) * delta**2 * np.sign(0 - delta**2)  # v_0 = 0
    assert yogi == pytest.approx(X["w"] + 0.01 * m / (np.sqrt(v) + 1e-3), abs=1e-5)

    adagrad = _round(FedAdagrad(eta=0.1, tau=1e-3, **_kwargs()))["w"]
    assert adagrad == pytest.approx(X["w"] + 0.1 * delta / (np.sqrt(delta**2) + 1e-3), abs=1e-5)

    strategy = FedAvgM(server_learning_rate=0.5, server_momentum=0.9, **_kwargs())
    first = _round(strategy, 1)["w"]
    assert first == pytest.approx(X["w"] + 0.5 * delta, abs=1e-5)  # momentum starts at g
    second = _round(strategy, 2, {"w": first})["w"]
    g2 = first - np.mean(CLIENTS, axis=0)
    assert second == pytest.approx(first - 0.5 * (0.9 * -delta + g2), abs=1e-5)


def test_scaffold_server_updates_weights_and_control_variate() -> None:
    strategy = Scaffold(population_size=10, lr=0.5, **_kwargs())
    payload, config = strategy.payload(1, record(X), {})
    assert set(payload) == {"w", SCAFFOLD_C_PREFIX + "w"}
    assert config["scaffold"] is True
    deltas = [np.array([0.1, 0.0, -0.2]), np.array([0.3, 0.1, 0.0]), np.array([-0.1, 0.2, 0.2])]
    replies = [
        reply_content({"w": c}, **{SCAFFOLD_DC_PREFIX + "w": d})
        for c, d in zip(CLIENTS, deltas, strict=True)
    ]

    new = run_round(strategy, replies, X)
    assert new is not None

    assert new["w"].numpy() == pytest.approx(
        X["w"] + 0.5 * (np.mean(CLIENTS, axis=0) - X["w"]), abs=1e-6
    )
    assert strategy.control is not None
    assert strategy.control["w"] == pytest.approx(3 / 10 * np.mean(deltas, axis=0), abs=1e-6)


def test_warmup_decay_schedule_values_and_server_lr_applied() -> None:
    schedule = ServerLRSchedule(
        num_rounds=130, kind="warmup_decay", warmup_rounds=30, final_factor=0.02
    )
    assert schedule.lr(1, 1.0) == pytest.approx(1 / 30)
    assert schedule.lr(15, 1.0) == pytest.approx(0.5)
    assert schedule.lr(30, 1.0) == pytest.approx(1.0)
    assert schedule.lr(80, 1.0) == pytest.approx(1 - 0.98 * 0.5)
    assert schedule.lr(130, 1.0) == pytest.approx(0.02)
    assert ServerLRSchedule(num_rounds=10).lr(7, 1.0) == 1.0

    strategy = FedYogi(eta=0.2, **_kwargs())
    scheduled = ScheduledServerLR(server_strategy(strategy), schedule)
    scheduled.before_round(15)
    assert strategy.eta == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"server_lr_schedule\.kind='warmup_decay': FedAvg has"):
        ScheduledServerLR(server_strategy(FedAvg(**_kwargs())), schedule)
