"""Bad outcomes are said, and blamed on their real cause (real simulation, injected faults)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flair_fl.errors import NoRoundTrained, TrainingDiverged
from flair_fl.modes.federated import run_experiment
from tests.helpers import compose_config


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_a_run_whose_every_round_was_skipped_fails_with_the_reason(
    run_overrides: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = [*run_overrides, "client.faults.probability=1.0", "client.faults.kinds=[raise]"]

    with caplog.at_level(logging.WARNING), pytest.raises(NoRoundTrained) as err:
        run_experiment(compose_config(overrides), tmp_path)

    message = str(err.value)
    assert "every round (2) was skipped" in message and "6 raised" in message
    assert "min_replies=1" in message and "client.lr" not in message
    assert "injected fault (raise, client.faults)" in caplog.text
    assert not (tmp_path / "model_final.pt").exists()


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_divergence_from_injected_nan_names_no_checkpoint_and_blames_no_lr(
    run_overrides: list[str], tmp_path: Path
) -> None:
    overrides = [
        *run_overrides,
        "checkpoint_every=0",
        "client.faults.probability=1.0",
        "client.faults.kinds=[nan]",
    ]

    with pytest.raises(TrainingDiverged) as err:
        run_experiment(compose_config(overrides), tmp_path)

    message = str(err.value)
    assert "round 1" in message and "injected by client.faults" in message
    assert "client.lr" not in message
    assert "no checkpoint was written" in message and "checkpoint.pt" not in message
