"""Sweeps: a failed job is recorded and cleaned up; grid and Optuna multiruns complete."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from flair_fl.errors import ConfigError
from flair_fl.loggers import SafeLogger, open_loggers
from flair_fl.services.job_failure import FAILED_JOB_SCORE, job_failed
from tests.wandb_records import offline_runs, read_offline_run

REPO = Path(__file__).resolve().parents[1]


class FakeRay:
    """Stands in for the `ray` module: records whether it was shut down."""

    def __init__(self) -> None:
        self.up = True

    def is_initialized(self) -> bool:
        return self.up

    def shutdown(self) -> None:
        self.up = False


class Closable:
    def __init__(self) -> None:
        self.closed = False

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None: ...

    def log_summary(self, summary: dict[str, Any]) -> None: ...

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def multirun() -> Iterator[None]:
    hydra_cfg = OmegaConf.structured(HydraConf)
    hydra_cfg.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))
    yield
    HydraConfig.instance().cfg = None


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> FakeRay:
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    return ray


def test_a_failed_sweep_job_is_recorded_cleaned_up_and_scores_minus_inf(
    tmp_path: Path, multirun: None, fake_ray: FakeRay, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = Closable()
    SafeLogger("wandb", lambda: logger)

    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        score = job_failed(err, tmp_path, continue_sweep=True)

    assert score == FAILED_JOB_SCORE == -math.inf
    assert "RuntimeError: boom" in (tmp_path / "error.txt").read_text()
    assert "Traceback" in (tmp_path / "error.txt").read_text()
    assert logger.closed and not open_loggers()
    assert not fake_ray.up
    assert "the sweep goes on" in capsys.readouterr().err


def test_without_continue_on_error_the_sweep_stops(
    tmp_path: Path, multirun: None, fake_ray: FakeRay
) -> None:
    with pytest.raises(SystemExit) as stop:
        job_failed(RuntimeError("boom"), tmp_path, continue_sweep=False)

    assert stop.value.code == 1  # SystemExit passes Hydra's per-job error handling
    assert (tmp_path / "error.txt").is_file() and not fake_ray.up


def test_a_single_run_exits_2_on_config_errors_and_raises_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        job_failed(ConfigError("num_rounds=0: must be in [1, inf]"), tmp_path, True)
    assert stop.value.code == 2
    assert "flair-fl: error: num_rounds=0" in capsys.readouterr().err

    with pytest.raises(RuntimeError, match="boom"):
        job_failed(RuntimeError("boom"), tmp_path / "other", True)
    assert (tmp_path / "other" / "error.txt").is_file()


def _run_sweep(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flair_fl.run", "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(
        (p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")),
        key=lambda p: int(p.name.split("_")[0]),
    )


@pytest.mark.slow
def test_grid_sweep_goes_on_after_a_failed_job(run_overrides: list[str], tmp_path: Path) -> None:
    # Prepare: job 0 dies with W&B and Ray up; job 1 checks it finds both cleaned up, then runs
    sweep_dir = tmp_path / "sweep"
    targets = "tests.failing.crash_after_start,tests.failing.run_if_clean"

    # Execute
    done = _run_sweep(
        [
            f"mode._target_={targets}",
            "logger=wandb",
            "logger.wandb.mode=offline",
            f"hydra.sweep.dir={sweep_dir}",
            *run_overrides,
        ]
    )

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the sweep goes on" in done.stderr
    crashed, clean = _job_dirs(sweep_dir)
    assert "RuntimeError: boom" in (crashed / "error.txt").read_text()
    assert not (crashed / "summary.json").exists()
    summary = json.loads((clean / "summary.json").read_text())
    assert summary["rounds"] == 2 and not (clean / "error.txt").exists()
    for name in ("metrics.csv", "metrics.jsonl", "val_ap.png", "loss.png", "model_final.pt"):
        assert (clean / name).is_file(), name
    runs = [read_offline_run(offline_runs(job)[0]) for job in (crashed, clean)]
    assert [run.exit_code for run in runs] == [1, 0]  # the crashed job's W&B run was finished
    assert runs[0].group == runs[1].group == f"{tmp_path.name}/sweep"
    assert runs[0].name != runs[1].name and "run_if_clean" in runs[1].name
    assert sorted(int(row["_step"]) for row in runs[1].history) == [0, 1, 2]  # 0: untrained
    # The sweep's summary lists the failed job
    table = subprocess.run(
        [sys.executable, "scripts/summarize.py", str(sweep_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert table.returncode == 0, table.stderr
    assert f"{crashed.name}: RuntimeError: boom" in table.stdout


@pytest.mark.slow
def test_optuna_search_runs_its_trials_and_maximises_best_val_ap(
    run_overrides: list[str], tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "optuna"

    done = _run_sweep(
        [
            "hparams_search=fedadam_optuna",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep_dir}",
            *run_overrides,
        ]
    )

    assert done.returncode == 0, done.stderr[-3000:]
    jobs = _job_dirs(sweep_dir)
    assert len(jobs) == 2
    scores, learning_rates = [], []
    for job in jobs:
        assert (job / "metrics.jsonl").is_file() and (job / "val_ap.png").is_file()
        scores.append(json.loads((job / "summary.json").read_text())["best_val_macro_ap"])
        config = OmegaConf.load(job / "config_resolved.yaml")
        assert config.strategy.server._target_.endswith("ServerOptimizer")
        assert 0.003 <= config.client.lr <= 0.3 and 0.003 <= config.strategy.server.lr <= 1.0
        learning_rates.append(config.client.lr)
    assert learning_rates[0] != learning_rates[1]  # two sampled trials, not one setting twice
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(scores))
