"""W&B logging: real offline runs, read back from their `.wandb` files (no mocks of wandb)."""

from __future__ import annotations

import json
import numbers
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from flair_fl.loggers.wandb import RUN_ID_FILE, WandbLogger
from flair_fl.modes.federated import run_experiment
from tests.helpers import compose_config, metrics_rows
from tests.wandb_records import OfflineRun, offline_runs, read_offline_run

REPO = Path(__file__).resolve().parents[1]
SWEEP_GROUP, JOB_NAME = "2025-01-31/12-00-00", "client.lr=0.05,seed=1"


@pytest.fixture
def multirun_job() -> Iterator[None]:
    """Hydra's job context as inside a multirun launched in outputs/multirun/<date>/<time>."""
    hydra_cfg = OmegaConf.structured(HydraConf)
    hydra_cfg.mode = RunMode.MULTIRUN
    hydra_cfg.sweep.dir = f"outputs/multirun/{SWEEP_GROUP}"
    hydra_cfg.job.override_dirname = JOB_NAME
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))
    yield
    HydraConfig.instance().cfg = None


def _steps(run: OfflineRun) -> dict[int, dict[str, object]]:
    """History merged by W&B step (a step's values may span several records)."""
    steps: dict[int, dict[str, object]] = {}
    for row in run.history:
        steps.setdefault(int(row["_step"]), {}).update(row)  # type: ignore[call-overload]
    return steps


def test_offline_run_holds_every_round_the_summary_and_the_sweep_group(
    tmp_path: Path, multirun_job: None
) -> None:
    # Prepare
    logger = WandbLogger(tmp_path, run_config={"client": {"lr": 0.05}, "seed": 1}, mode="offline")

    # Execute
    logger.log_round(1, {"train_loss": 0.9, "clients_ok": 3, "note": "dropped: not a number"})
    logger.log_round(2, {"train_loss": 0.7, "val_macro_ap": 0.4, "dp_noise_multiplier": 1.1})
    logger.log_summary({"best_val_macro_ap": 0.4, "final_test_macro_ap": 0.35})
    logger.close()

    # Assert
    (run_dir,) = offline_runs(tmp_path)
    run = read_offline_run(run_dir)
    assert (run.group, run.name, run.project) == (SWEEP_GROUP, JOB_NAME, "flair-fl")
    steps = _steps(run)
    assert sorted(steps) == [1, 2]
    assert steps[1]["train_loss"] == 0.9 and steps[1]["clients_ok"] == 3
    assert "note" not in steps[1]
    assert steps[2]["val_macro_ap"] == 0.4 and steps[2]["dp_noise_multiplier"] == 1.1
    assert run.summary["final_test_macro_ap"] == 0.35
    assert run.config["client"] == {"lr": 0.05} and run.config["seed"] == 1
    assert run.exit_code == 0


def test_explicit_group_and_name_win_and_a_run_without_summary_is_marked_failed(
    tmp_path: Path, multirun_job: None
) -> None:
    logger = WandbLogger(tmp_path, mode="offline", group="lr-search", name="trial-a")

    logger.log_round(1, {"train_loss": 1.0})
    logger.close()  # no summary: the job died (run.py closes the loggers of a failed job)

    run = read_offline_run(offline_runs(tmp_path)[0])
    assert (run.group, run.name) == ("lr-search", "trial-a")
    assert run.exit_code == 1


def test_a_resumed_run_dir_continues_its_wandb_run(tmp_path: Path) -> None:
    first = WandbLogger(tmp_path, mode="offline")
    first_id = first.run.id
    first.close()

    resumed = WandbLogger(tmp_path, mode="offline")
    resumed_id = resumed.run.id
    resumed.close()

    assert (tmp_path / "wandb" / RUN_ID_FILE).read_text() == first_id
    assert resumed_id == first_id


def test_disabled_mode_logs_nothing_and_writes_nothing(tmp_path: Path) -> None:
    logger = WandbLogger(tmp_path, mode="disabled")

    logger.log_round(1, {"train_loss": 1.0})
    logger.log_summary({"best_val_macro_ap": 0.5})
    logger.close()

    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_run_with_wandb_offline_and_a_broken_logger_completes(
    run_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: csv + plots + W&B, and a logger that raises in every call
    cfg = compose_config(
        [
            *run_overrides,
            "logger=wandb",
            "logger.wandb.mode=offline",
            "+logger.broken._target_=tests.failing.BrokenLogger",
        ]
    )

    # Execute
    summary = run_experiment(cfg, tmp_path)

    # Assert: training finished, the broken logger was reported once and counted
    rows = metrics_rows(tmp_path)
    assert [row["round"] for row in rows] == [1, 2] and summary["rounds"] == 2
    stderr = capsys.readouterr().err
    assert stderr.count("logger 'broken' failed in") == 1
    assert "RuntimeError: broken logger: round 1" in stderr
    assert "logger 'broken' failed 4 times in all" in stderr  # 2 rounds, summary, close
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["logger_errors"] == 2  # the errors before the summary was written
    # Assert: the W&B run holds every round's numeric metrics, the summary and the config
    (run_dir,) = offline_runs(tmp_path)
    run = read_offline_run(run_dir)
    steps = _steps(run)
    assert sorted(steps) == [0, 1, 2]  # step 0: the untrained model's val metrics
    assert steps[0]["val_macro_ap"] == summary["untrained_val_macro_ap"]
    assert steps[0]["val_loss"] == summary["untrained_val_loss"]
    for row in rows:
        numeric = {k: v for k, v in row.items() if k != "round" and isinstance(v, numbers.Real)}
        assert numeric and {k: steps[row["round"]][k] for k in numeric} == numeric
    assert run.summary["final_test_macro_ap"] == summary["final_test_macro_ap"]
    assert run.summary["best_val_macro_ap"] == summary["best_val_macro_ap"]
    assert run.config["num_rounds"] == 2 and run.config["logger"]["wandb"]["mode"] == "offline"
    assert run.exit_code == 0
    assert (tmp_path / "val_ap.png").is_file() and (tmp_path / "loss.png").is_file()


KILLED_AFTER_FLUSH = """
import sys, time
from flair_fl.loggers.wandb import WandbLogger

logger = WandbLogger(sys.argv[1], mode="offline")
logger.log_untrained({"val_macro_ap": 0.1})
for server_round in (1, 2, 3):
    logger.log_round(server_round, {"train_loss": 1.0 / server_round})
logger.flush()  # what every checkpoint does first
print("flushed", flush=True)
time.sleep(120)
"""


def test_rounds_flushed_at_a_checkpoint_survive_a_sigkill(tmp_path: Path) -> None:
    # Prepare: a process that logs rounds 0-3, flushes as a checkpoint does, then waits
    script = tmp_path / "child.py"
    script.write_text(KILLED_AFTER_FLUSH)
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "flushed"

    # Execute: killed outright, no handler, no W&B finish
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    # Assert: the offline file holds every round logged before the flush (wandb-core's
    # writes would otherwise come every 15 s: the file held only its header)
    (run_dir,) = offline_runs(tmp_path / "run")
    run = read_offline_run(run_dir, timeout=0)
    assert run.exit_code is None  # never finished: what was read is what the flush wrote
    assert sorted(_steps(run)) == [0, 1, 2, 3]
    assert _steps(run)[3]["train_loss"] == pytest.approx(1 / 3)
