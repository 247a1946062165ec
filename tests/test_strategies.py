"""Server strategies against numbers worked out by hand (or by an independent formula)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAdagrad, FedAvg, FedAvgM, FedYogi

from flair_fl.federated.schedule import ScheduledServerLR, ServerLRSchedule
from flair_fl.federated.strategies import (
    SCAFFOLD_C_PREFIX,
    SCAFFOLD_DC_PREFIX,
    Scaffold,
    ServerOptimizer,
)
from tests.flower_messages import arrays, reply

X = {"w": np.array([1.0, -2.0, 0.5], dtype=np.float32)}
CLIENTS = [np.array([0.8, -1.5, 0.5]), np.array([1.1, -2.5, 0.0]), np.array([0.9, -2.0, 1.0])]


class _Grid:
    """configure_train only asks the grid for node ids."""

    def get_node_ids(self) -> list[int]:
        return [1]


def _round(
    strategy,
    server_round: int = 1,
    x: dict[str, np.ndarray] = X,
    clients: list[np.ndarray] = CLIENTS,
) -> dict[str, np.ndarray]:
    list(strategy.configure_train(server_round, arrays(x), ConfigRecord(), _Grid()))
    new, _ = strategy.aggregate_train(server_round, [reply({"w": c}) for c in clients])
    return {k: v.numpy() for k, v in new.items()}


def _kwargs(key: str = "uniform-weight") -> dict[str, object]:
    return {"weighted_by_key": key, "min_available_nodes": 1, "min_train_nodes": 1}


def test_fedavg_uniform_and_example_weighting() -> None:
    uniform = _round(FedAvg(**_kwargs()))["w"]
    assert uniform == pytest.approx(np.mean(CLIENTS, axis=0), abs=1e-6)

    strategy = FedAvg(**_kwargs("num-examples"))
    list(strategy.configure_train(1, arrays(X), ConfigRecord(), _Grid()))
    replies = [reply({"w": c}, num_examples=n) for c, n in zip(CLIENTS, (1, 2, 7), strict=True)]
    weighted, _ = strategy.aggregate_train(1, replies)
    expected = (CLIENTS[0] * 1 + CLIENTS[1] * 2 + CLIENTS[2] * 7) / 10
    assert weighted["w"].numpy() == pytest.approx(expected, abs=1e-6)


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
    sent = list(strategy.configure_train(1, arrays(X), ConfigRecord(), _Grid()))
    payload = sent[0].content.array_records["arrays"]
    assert set(payload) == {"w", SCAFFOLD_C_PREFIX + "w"}
    assert sent[0].content.config_records["config"]["scaffold"] is True
    deltas = [np.array([0.1, 0.0, -0.2]), np.array([0.3, 0.1, 0.0]), np.array([-0.1, 0.2, 0.2])]
    replies = [
        reply({"w": c, SCAFFOLD_DC_PREFIX + "w": d}) for c, d in zip(CLIENTS, deltas, strict=True)
    ]

    new, _ = strategy.aggregate_train(1, replies)

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
    scheduled = ScheduledServerLR(strategy, schedule)
    scheduled.before_round(15)
    assert strategy.eta == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"server_lr_schedule\.kind='warmup_decay'"):
        ScheduledServerLR(FedAvg(**_kwargs()), schedule)
