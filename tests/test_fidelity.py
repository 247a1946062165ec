"""Results that mean what they say (issue: parity with pfl-research, fidelity items).

Best-val over trained rounds and the summary keys are checked on a RoundTracker driven by a
crafted evaluator: the "model" is one number w and its val/test macro AP is w, so every
expected value is known by construction. Sweep summaries are checked on crafted job dirs.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord

from flair_fl.artifacts.summarize import CSV_NAME, find_jobs, format_text, summarize, write_outputs
from flair_fl.federated.callbacks import (
    BestModel,
    CentralEval,
    LogRounds,
    PrivacyMetrics,
    RoundTracker,
)
from flair_fl.federated.round import LoopOutcome
from flair_fl.loggers import LoggerErrors, start_logger
from flair_fl.loggers.console import ConsoleProgress
from flair_fl.loggers.files import file_logger
from flair_fl.loggers.wandb import WandbLogger
from flair_fl.modes.build import build
from flair_fl.privacy import NoPrivacy, PrivacyContext
from flair_fl.privacy.accounting import update_noise_multiplier
from flair_fl.privacy.central import AdaptiveClipping, CentralDP
from flair_fl.privacy.local import LocalDPSGD
from tests.helpers import compose_config
from tests.wandb_records import offline_runs, read_offline_run


def model(w: float) -> ArrayRecord:
    return ArrayRecord(OrderedDict(w=torch.tensor([w], dtype=torch.float64)))


class CraftedEvaluator:
    """Scores a model w: macro/micro AP w, loss 1 - w, on every split."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1)

    def __call__(self, arrays: ArrayRecord, split: str) -> dict[str, float]:
        w = float(arrays.to_torch_state_dict()["w"].item())
        return {f"{split}_macro_ap": w, f"{split}_micro_ap": w, f"{split}_loss": 1 - w}


def tracker(out: Path, num_rounds: int, eval_every: int, privacy: object = None) -> RoundTracker:
    """The after-round work of a run (privacy metrics, best model, loggers), as built for a
    federated run, around the crafted evaluator."""
    evaluator: Any = CraftedEvaluator()
    loggers = [start_logger("csv", file_logger, LoggerErrors(), out_dir=out, run_config={})]
    started = time.perf_counter()
    return RoundTracker(
        CentralEval(evaluator, eval_every, num_rounds),
        [
            PrivacyMetrics(privacy or NoPrivacy()),  # type: ignore[arg-type]
            BestModel(evaluator, out),
            LogRounds(loggers, num_rounds, started),
        ],
        evaluator(model(0.5), "val"),  # the untrained model scores 0.5
        out,
        started,
    )


def test_best_is_taken_over_trained_rounds_even_when_the_untrained_model_scores_higher(
    tmp_path: Path,
) -> None:
    # Prepare: trained rounds score 0.2, 0.3, 0.25, all below the untrained 0.5
    run = tracker(tmp_path, num_rounds=3, eval_every=1)

    # Execute
    for server_round, w in ((1, 0.2), (2, 0.3), (3, 0.25)):
        run.after_round(server_round, model(w), {"train_loss": 1.0})
    summary = run.finish(LoopOutcome(arrays=model(0.25), rounds_done=3))

    # Assert
    assert summary["best_round"] == 2 and summary["best_val_macro_ap"] == 0.3
    assert summary["best_test_macro_ap"] == 0.3  # the best-val model's test score
    assert (summary["untrained_val_macro_ap"], summary["untrained_val_loss"]) == (0.5, 0.5)
    assert summary["final_test_macro_ap"] == 0.25
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["best_test_macro_ap"] == 0.3 and on_disk["best_round"] == 2
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["untrained"] == {"val_macro_ap": 0.5, "val_micro_ap": 0.5, "val_loss": 0.5}
    assert results["best_round"] == 2


def test_a_run_stopped_before_its_last_evaluation_takes_the_final_model_as_best(
    tmp_path: Path,
) -> None:
    # Prepare: 10 rounds planned, evaluation every 5, stopped (budget) after round 3
    run = tracker(tmp_path, num_rounds=10, eval_every=5)
    for server_round in (1, 2, 3):
        run.after_round(server_round, model(0.1 * server_round), {"train_loss": 1.0})

    # Execute
    summary = run.finish(LoopOutcome(arrays=model(0.3), rounds_done=3, stop_reason="budget"))

    # Assert: never the untrained 0.5; the only evaluated trained model is round 3's
    assert summary["best_round"] == 3 and summary["best_val_macro_ap"] == pytest.approx(0.3)
    assert summary["best_test_macro_ap"] == pytest.approx(0.3)
    assert (tmp_path / "model_best.pt").is_file()


def test_results_carry_the_noise_multiplier(tmp_path: Path) -> None:
    run = tracker(tmp_path, 1, 1, privacy=LocalDPSGD(noise_multiplier=1.3))
    run.after_round(1, model(0.4), {})

    summary = run.finish(LoopOutcome(arrays=model(0.4), rounds_done=1))

    assert summary["privacy_noise_multiplier"] == 1.3
    assert json.loads((tmp_path / "results.json").read_text())["privacy"]["noise_multiplier"] == 1.3


def test_wandb_gets_the_untrained_model_as_step_0(tmp_path: Path) -> None:
    logger = start_logger(
        "wandb", WandbLogger, LoggerErrors(), out_dir=tmp_path, run_config={}, mode="offline"
    )

    logger.log_untrained({"val_macro_ap": 0.5, "val_loss": 0.69})
    logger.log_round(1, {"val_macro_ap": 0.6})
    logger.close()

    history = read_offline_run(offline_runs(tmp_path)[0]).history
    step0 = [row for row in history if int(row["_step"]) == 0]  # type: ignore[call-overload]
    assert step0 and step0[0]["val_macro_ap"] == 0.5 and step0[0]["val_loss"] == 0.69


def _job(root: Path, num: int, seed: int, summary: dict[str, float] | None) -> None:
    job = root / f"{num}_seed={seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- strategy=fedavg\n- seed={seed}\n")
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))


def test_summarize_cells_say_how_many_jobs_they_average(tmp_path: Path) -> None:
    # Prepare: 3 finished jobs, one without a test evaluation; 1 failed job
    _job(tmp_path, 0, 0, {"best_val_macro_ap": 0.2, "best_test_macro_ap": 0.1})
    _job(tmp_path, 1, 1, {"best_val_macro_ap": 0.4, "best_test_macro_ap": 0.3})
    _job(tmp_path, 2, 2, {"best_val_macro_ap": 0.6})
    _job(tmp_path, 3, 3, None)

    # Execute
    table = summarize(find_jobs(tmp_path), ["best_val_macro_ap", "best_test_macro_ap"])
    text = format_text(table)
    write_outputs(table, tmp_path / "out")

    # Assert
    (row,) = table.rows
    assert (row.done, row.failed) == (3, 1)
    assert (row.count("best_val_macro_ap"), row.count("best_test_macro_ap")) == (3, 2)
    assert "0.4000 ± 0.2000" in text and "0.4000 ± 0.2000 (n=" not in text
    assert "0.2000 ± 0.1414 (n=2)" in text
    with (tmp_path / "out" / CSV_NAME).open() as f:
        (line,) = list(csv.DictReader(f))
    assert (line["n"], line["best_val_macro_ap_n"], line["best_test_macro_ap_n"]) == ("3", "3", "2")


def test_debug_tiny_composes_with_the_real_data_source(tiny_hdf5: Path) -> None:
    # Execute
    cfg = compose_config(["debug=tiny", "data=flair", f"data.path={tiny_hdf5}"])
    data = build(cfg.data, "data")
    synthetic = compose_config(["debug=tiny"]).data

    # Assert
    assert data.hdf5_path == tiny_hdf5 and data.input_size == 16
    assert "num_users" not in cfg.data
    assert (synthetic.num_users, synthetic.image_size, synthetic.input_size) == (40, 16, 16)
    assert compose_config(["debug=tiny", "data.num_users=200"]).data.num_users == 200
    assert compose_config([]).data.num_users == 500


def test_dp_adaptive_defaults_work_for_a_tiny_cohort() -> None:
    # Prepare: debug=tiny's cohort 3 of 32 users; cohort / 20 = 0.15 is below z / 2
    privacy = CentralDP(epsilon=2.0, delta=None, adaptive=AdaptiveClipping())
    context = PrivacyContext(3, 32, 2, 0, "uniform-weight")

    # Execute
    cal = privacy.calibrate(context)

    # Assert: sigma_b = z, so z_update = z * 2 / sqrt(3)
    assert cal.count_stddev == pytest.approx(cal.noise_multiplier)
    assert cal.update_noise_multiplier == pytest.approx(cal.noise_multiplier * 2 / 3**0.5)
    assert update_noise_multiplier(cal.noise_multiplier, cal.count_stddev) == pytest.approx(
        cal.update_noise_multiplier
    )
    big = CentralDP(adaptive=AdaptiveClipping()).calibrate(PrivacyContext(200, 41131, 50, 0, "u"))
    assert big.count_stddev == 10.0  # ml-flair's cohort / 20 where it is large enough


def test_delta_above_one_over_population_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        CentralDP(delta=0.05).calibrate(PrivacyContext(3, 32, 2, 0, "uniform-weight"))
        warned = [r.getMessage() for r in caplog.records]
        caplog.clear()
        CentralDP(delta=1e-5).calibrate(PrivacyContext(3, 32, 2, 0, "uniform-weight"))

    assert any("privacy.delta=0.05 exceeds 1/population = 0.0312" in m for m in warned)
    assert not caplog.records


def test_progress_line_shows_the_server_lr_and_the_dp_sgd_epsilon() -> None:
    line = ConsoleProgress(5).line(
        1, {"train_loss": 0.5, "server_lr": 0.0033, "dp_sgd_epsilon": 1.234}
    )

    assert "server lr 0.0033" in line and "DP-SGD eps 1.23" in line
