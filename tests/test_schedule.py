"""The paper presets' server learning rate is pfl-research's, round by round.

pfl-research's FLAIR benchmark (benchmarks/flair/train.py) builds
`get_polynomial_decay_schedule_with_warmup(central_optimizer, num_warmup_steps=30,
num_training_steps=central_num_iterations, lr_end=0.02)` (benchmarks/utils/callback/
pytorch.py: a torch LambdaLR) and pfl's PyTorchModel.apply_model_update calls
`scheduler.step()` after each `optimizer.step()`. So central iteration i (round i + 1)
runs at lr_init * lambda(i). `pfl_lr` below writes that lambda out again, independently of
flair_fl, and drives a real torch LambdaLR the way pfl does.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from flair_fl.algorithms.fedopt import ServerOptimizer
from flair_fl.federated.schedule import ScheduledServerLR, ServerLRSchedule
from flair_fl.modes.build import build_strategy
from flair_fl.privacy import PrivacyContext
from tests.helpers import compose_config

PEAK, LR_END, WARMUP, STEPS = 0.1, 0.02, 30, 5000
ROUNDS = (1, 2, 3, 30, 31, 32, 100, 1000, 2500, 4999, 5000, 5001, 5002)


def pfl_lambda(step: int, lr_init: float = PEAK) -> float:
    """pfl-research's lr_lambda(current_step), written out."""
    if step < WARMUP:
        return float(step) / float(max(1, WARMUP))
    if step > STEPS:
        return LR_END / lr_init
    pct_remaining = 1 - (step - WARMUP) / (STEPS - WARMUP)
    return ((lr_init - LR_END) * pct_remaining**1.0 + LR_END) / lr_init


@functools.cache
def pfl_lr_by_round(last_round: int) -> dict[int, float]:
    """The lr each round's server update uses, stepping a torch LambdaLR as pfl does."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], PEAK, eps=0.01, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pfl_lambda)
    used = {}
    for server_round in range(1, last_round + 1):
        used[server_round] = optimizer.param_groups[0]["lr"]
        optimizer.step()  # no gradient: a no-op step; the lr is the point
        scheduler.step()  # pfl steps its scheduler after each server update
    return used


def preset_schedule(preset: str = "fl_r_17") -> ScheduledServerLR:
    cfg = compose_config([f"experiment={preset}", "num_rounds=5000"])
    context = PrivacyContext(200, 41131, cfg.num_rounds, 0, "uniform-weight")
    _, schedule = build_strategy(cfg, context)
    return schedule


@pytest.mark.parametrize("preset", ["fl_r_17", "fl_f_17", "fl_r_1628", "fl_f_1628"])
def test_preset_server_lr_equals_pfl_research_round_by_round(preset: str) -> None:
    # Prepare
    expected = pfl_lr_by_round(max(ROUNDS))
    schedule = preset_schedule(preset)

    # Execute
    ours = {r: schedule.lr(r) for r in ROUNDS}

    # Assert
    assert isinstance(schedule.strategy, ServerOptimizer) and schedule.peak == PEAK
    for server_round in ROUNDS:
        assert ours[server_round] == pytest.approx(expected[server_round], rel=1e-12, abs=1e-15)
    assert ours[1] == 0.0  # step 0: factor 0
    assert ours[2] == pytest.approx(PEAK / 30)
    assert ours[30] == pytest.approx(PEAK * 29 / 30)
    assert ours[31] == pytest.approx(PEAK)  # the peak comes at round 31
    assert ours[32] < PEAK
    assert ours[5001] == pytest.approx(LR_END)  # lr_end is absolute: 0.2x the peak
    assert ours[5002] == pytest.approx(LR_END)  # and stays there past num_training_steps


def test_polynomial_schedule_with_power_and_other_lengths() -> None:
    # Prepare: power 2, T = 20, W = 5, peak 1.0, lr_end 0.1 (hand values)
    schedule = ServerLRSchedule(
        num_rounds=30,
        kind="polynomial_decay_with_warmup",
        warmup_rounds=5,
        training_steps=20,
        lr_end=0.1,
        power=2.0,
    )

    # Execute / Assert: round r uses step r - 1
    assert schedule.lr(1, 1.0) == 0.0
    assert schedule.lr(3, 1.0) == pytest.approx(2 / 5)
    assert schedule.lr(6, 1.0) == pytest.approx(1.0)
    assert schedule.lr(11, 1.0) == pytest.approx(0.9 * (1 - 5 / 15) ** 2 + 0.1)
    assert schedule.lr(21, 1.0) == pytest.approx(0.1)
    assert schedule.lr(30, 1.0) == pytest.approx(0.1)
    assert ServerLRSchedule(num_rounds=8, kind="polynomial_decay_with_warmup").decay_end == 8


def test_polynomial_schedule_refusals() -> None:
    with pytest.raises(ValueError, match=r"server_lr_schedule\.training_steps=30: must be >"):
        ServerLRSchedule(
            num_rounds=31, kind="polynomial_decay_with_warmup", warmup_rounds=30, training_steps=30
        )
    ServerLRSchedule(num_rounds=30, kind="polynomial_decay_with_warmup", warmup_rounds=30)
    with pytest.raises(ValueError, match=r"server_lr_schedule\.lr_end=0\.5: must be <="):
        cfg = compose_config(
            ["experiment=fl_r_17", "num_rounds=100", "server_lr_schedule.lr_end=0.5"]
        )
        build_strategy(cfg, PrivacyContext(200, 41131, cfg.num_rounds, 0, "uniform-weight"))


def test_warns_when_the_run_ends_inside_the_warm_up(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    cfg = compose_config(["experiment=fl_r_17", "num_rounds=30"])  # peak would be round 31
    context = PrivacyContext(200, 41131, cfg.num_rounds, 0, "uniform-weight")

    # Execute
    with caplog.at_level(logging.WARNING):
        build_strategy(cfg, context)
        warned_short = [r.getMessage() for r in caplog.records]
        caplog.clear()
        longer = compose_config(["experiment=fl_r_17", "num_rounds=31"])
        build_strategy(longer, context)

    # Assert
    assert any("num_rounds=30 ends before the server lr warm-up" in m for m in warned_short)
    assert not [r for r in caplog.records if "warm-up" in r.getMessage()]
