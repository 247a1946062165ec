"""The guard around every logger: failures are reported once, counted, and never raised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flair_fl.errors import ConfigError
from flair_fl.loggers import (
    LoggerErrors,
    SafeLogger,
    close_open_loggers,
    open_loggers,
    start_logger,
)
from flair_fl.loggers.files import FileLogger
from flair_fl.modes.build import build_loggers
from tests.failing import BrokenLogger
from tests.helpers import compose_config


class Recorder:
    """Remembers what it was given."""

    def __init__(self) -> None:
        self.rounds: list[int] = []
        self.summary: dict[str, Any] | None = None
        self.closed = 0
        self.resumed_from: int | None = None

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        self.rounds.append(server_round)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.summary = dict(summary)

    def close(self) -> None:
        self.closed += 1

    def resume_from(self, last_round: int) -> None:
        self.resumed_from = last_round


def _fail() -> Recorder:
    raise OSError("no route to host")


def test_failures_are_reported_once_counted_and_shared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    errors = LoggerErrors()
    broken = SafeLogger("broken", lambda: BrokenLogger(tmp_path), errors)
    recorder = Recorder()
    healthy = SafeLogger("healthy", lambda: recorder, errors)

    for server_round in (1, 2, 3):
        broken.log_round(server_round, {})
        healthy.log_round(server_round, {})
    summary: dict[str, Any] = {"rounds": 3}
    healthy.log_summary(summary)

    assert recorder.rounds == [1, 2, 3]
    assert recorder.summary == {"rounds": 3, "logger_errors": 3}
    assert summary["logger_errors"] == 3
    err = capsys.readouterr().err
    assert err.count("logger 'broken' failed in log_round") == 1
    assert "RuntimeError: broken logger: round 1" in err and "round 2" not in err


def test_a_logger_that_cannot_start_is_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    errors = LoggerErrors()
    logger = SafeLogger("wandb", _fail, errors)

    logger.log_round(1, {"train_loss": 1.0})
    logger.log_summary({})
    logger.close()

    assert logger.inner is None and errors.count == 1
    assert "logger 'wandb' failed in start" in capsys.readouterr().err


def test_close_open_loggers_closes_what_a_failed_job_left_open() -> None:
    recorder = Recorder()
    logger = SafeLogger("recorder", lambda: recorder)
    assert logger in open_loggers()

    closed = close_open_loggers()

    assert closed >= 1 and recorder.closed == 1
    assert logger not in open_loggers()
    logger.close()  # closing twice is harmless
    assert recorder.closed == 1


def test_resume_is_forwarded_to_loggers_that_keep_history() -> None:
    recorder = Recorder()
    logger = SafeLogger("recorder", lambda: recorder)

    logger.resume_from(7)
    logger.close()

    assert recorder.resumed_from == 7


def test_a_misspelt_logger_key_is_a_config_error(tmp_path: Path) -> None:
    cfg = compose_config(["logger=wandb", "+logger.wandb.projekt=flair"])

    with pytest.raises(ConfigError) as err:
        build_loggers(cfg, tmp_path)

    close_open_loggers()  # the loggers before it had started (run.py closes them too)
    assert "logger.wandb" in str(err.value) and "projekt" in str(err.value)


def test_start_logger_passes_the_run_dir_and_config(tmp_path: Path) -> None:
    logger = start_logger("files", FileLogger, LoggerErrors(), out_dir=tmp_path)

    logger.log_round(1, {"train_loss": 0.5})
    logger.close()

    assert isinstance(logger, SafeLogger)
    assert (tmp_path / "metrics.jsonl").read_text().startswith('{"round": 1')
