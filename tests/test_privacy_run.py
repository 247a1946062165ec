"""Privacy end to end: the real Hydra presets through the real Flower simulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from opacus.accountants import RDPAccountant

from flair_fl.errors import ConfigError
from flair_fl.modes.federated import run_experiment
from flair_fl.privacy import PrivacyContext
from tests.helpers import compose_config, metrics_rows

DESCRIBED = {"mechanism", "noise_multiplier", "clip_norm", "epsilon", "delta", "q", "rounds"}


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_central_dp_run_logs_the_budget_and_stops_before_exceeding_max_epsilon(
    run_overrides: list[str], tmp_path: Path
) -> None:
    # One run covers the central mechanism end to end: adaptive clipping under FedAdam,
    # epsilon per round from the accountant, and max_epsilon set between the epsilon after
    # round 2 and after round 3, so the run must stop cleanly after round 2.
    base = [
        *run_overrides,
        "privacy=dp_adaptive",
        "strategy=fedadam",
        "num_rounds=3",
        "eval_every=0",
        "eval.test_at_end=false",
        "privacy.noise_multiplier=1.0",
        "privacy.adaptive.clipped_count_stddev=1.0",  # cohort 3: the default 0.15 is too small
    ]
    probe = instantiate(compose_config(base).privacy)
    users = len(list(instantiate(compose_config(base).data).reader.population("train")))
    probe.round_stages(PrivacyContext(3, users, 3, 0, "uniform-weight"))
    limit = (probe.epsilon_after(2) + probe.epsilon_after(3)) / 2
    cfg = compose_config([*base, f"privacy.max_epsilon={limit}"])

    summary = run_experiment(cfg, tmp_path)

    assert summary["rounds"] == 2
    assert "max_epsilon" in summary["stop_reason"] and "round 3" in summary["stop_reason"]
    described = json.loads((tmp_path / "privacy.json").read_text())
    assert described.keys() >= DESCRIBED | {"accountant", "update_noise_multiplier"}
    z, q, delta = described["noise_multiplier"], described["q"], described["delta"]
    assert (z, q, described["rounds"]) == (1.0, 3 / users, 3)
    assert delta == pytest.approx(users**-1.1)  # ml-flair's delta for this population
    rows = metrics_rows(tmp_path)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        accountant = RDPAccountant()
        accountant.history = [(z, q, row["round"])]
        assert row["dp_epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
        assert row["dp_noise_std"] == pytest.approx(
            described["update_noise_multiplier"] * row["dp_clip_norm"] / cfg.cohort_size
        )
        assert 0.0 <= row["dp_clipped_fraction"] <= 1.0 and row["dp_update_norm_mean"] > 0
        assert "dp_unclipped_fraction_noisy" in row
    assert rows[-1]["dp_epsilon"] < limit
    assert rows[0]["dp_clip_norm"] == 0.1 != rows[1]["dp_clip_norm"]  # C adapts after round 1
    assert summary["privacy_dp_epsilon"] == rows[-1]["dp_epsilon"]


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_dp_sgd_run_reports_the_worst_users_sample_level_epsilon(
    run_overrides: list[str], tmp_path: Path
) -> None:
    cfg = compose_config([*run_overrides, "privacy=dp_sgd", "eval.test_at_end=false"])

    summary = run_experiment(cfg, tmp_path)

    described = json.loads((tmp_path / "privacy.json").read_text())
    assert described["mechanism"] == "dp-sgd" and described["noise_multiplier"] == 1.0
    rows = metrics_rows(tmp_path)
    assert len(rows) == cfg.num_rounds and all(row["clients_ok"] == cfg.cohort_size for row in rows)
    worst = [row["dp_sgd_epsilon"] for row in rows]
    assert 0 < worst[0] <= worst[-1] and worst == sorted(worst)
    assert all(0 < row["dp_sgd_epsilon_round"] <= row["dp_sgd_epsilon"] for row in rows)
    assert summary["privacy_dp_sgd_epsilon"] == worst[-1]


def test_dp_sgd_refuses_a_batchnorm_model_before_training(
    run_overrides: list[str], tmp_path: Path
) -> None:
    cfg = compose_config([*run_overrides, "privacy=dp_sgd", "model.norm=batch"])

    with pytest.raises(ConfigError, match=r"model\.norm=group"):
        run_experiment(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_central_dp_refuses_example_weighted_aggregation(
    run_overrides: list[str], tmp_path: Path
) -> None:
    cfg = compose_config([*run_overrides, "privacy=dp", "aggregation=examples"])

    with pytest.raises(ConfigError, match="aggregation"):
        run_experiment(cfg, tmp_path)
