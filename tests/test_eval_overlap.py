"""Evaluation off the critical path (`eval.overlap`): round r's central evaluation runs in
the driver's background thread while round r+1 trains. The per-round metrics, best-model
selection, checkpoints, divergence stops and resume must equal the serial evaluation's."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from flair_fl.artifacts.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flair_fl.data.source import FederatedData
from flair_fl.federated.callbacks import BestModel, RoundTracker
from flair_fl.federated.contract import server_strategy
from flair_fl.federated.round import LoopOutcome, is_measurement
from flair_fl.learning.evaluator import CentralEvaluator
from flair_fl.models.params import trainable_state
from flair_fl.models.small_cnn import small_cnn
from flair_fl.modes.build import federated_tracker
from flair_fl.modes.federated import run_experiment
from flair_fl.privacy import NoPrivacy
from tests.helpers import compose_config, metrics_rows
from tests.test_resume import _kill_after_round, _run, resume_and_compare


class Rows:
    """A logger that keeps what it is given (the loggers' interface, in memory)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        self.rows.append({"round": server_round, **metrics})

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.summary = summary

    def close(self) -> None:
        pass


def _round_weights(num_labels: int, rounds: int, nan_round: int = 0) -> list[ArrayRecord]:
    """Global weights of `rounds` rounds: seeded models (NaN weights in `nan_round`)."""
    out = []
    for r in range(1, rounds + 1):
        torch.manual_seed(r)
        state = trainable_state(small_cnn(num_classes=num_labels, width=8))
        if r == nan_round:
            state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        out.append(ArrayRecord(state))
    return out


def _drive(
    tiny_hdf5: Path, out: Path, overlap: bool, rounds: int = 4, nan_round: int = 0
) -> tuple[RoundTracker, Rows, list[bool]]:
    """Feed the tracker `rounds` rounds as the round loop does; return what it logged. The
    tracker is the federated run's (modes/build.py), evaluating and checkpointing every round."""
    data = FederatedData(tiny_hdf5, input_size=24)
    torch.manual_seed(0)
    model = small_cnn(num_classes=data.num_labels, width=8)
    evaluator = CentralEvaluator(model, data, 32, torch.device("cpu"))
    initial = evaluator(ArrayRecord(trainable_state(model)), "val")
    rows = Rows()
    out.mkdir()
    overrides = ["debug=tiny", f"num_rounds={rounds}", "eval_every=1", "checkpoint_every=1"]
    cfg = compose_config([*overrides, f"eval.overlap={str(overlap).lower()}"])
    tracker, _ = federated_tracker(
        cfg,
        evaluator,
        NoPrivacy(),
        server_strategy(FedAvg()),
        [rows],
        out,
        initial,
        time.perf_counter(),
    )
    stops = []
    for r, arrays in enumerate(_round_weights(data.num_labels, rounds, nan_round), start=1):
        stops.append(tracker.after_round(r, arrays, {"train_loss": float(r)}))
        if stops[-1]:
            break
    return tracker, rows, stops


def _best(tracker: RoundTracker) -> dict[str, Any]:
    return next(c.best for c in tracker.callbacks if isinstance(c, BestModel))


def _learning(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not is_measurement(k)}


def test_overlapped_evaluation_logs_what_serial_evaluation_logs(tiny_hdf5: Path, tmp_path: Path):
    serial, serial_rows, _ = _drive(tiny_hdf5, tmp_path / "serial", overlap=False)
    overlap, overlap_rows, _ = _drive(tiny_hdf5, tmp_path / "overlap", overlap=True)
    last = _round_weights(serial.evaluation.evaluator.data.num_labels, 4)[-1]

    assert overlap.pending is not None and overlap.pending[0].number == 4  # still running
    summaries = [t.finish(LoopOutcome(arrays=last, rounds_done=4)) for t in (serial, overlap)]

    assert [r["round"] for r in overlap_rows.rows] == [1, 2, 3, 4]
    assert [_learning(r) for r in overlap_rows.rows] == [_learning(r) for r in serial_rows.rows]
    assert all("val_macro_ap" in r and "time_eval_s" in r for r in overlap_rows.rows)
    assert _learning(summaries[1]) == _learning(summaries[0])
    assert _best(overlap)["round"] == _best(serial)["round"]
    saved = [load_checkpoint(tmp_path / name) for name in ("serial", "overlap")]
    assert saved[1]["round"] == saved[0]["round"] == 4
    assert saved[1]["tracker"]["best"] == saved[0]["tracker"]["best"]


def test_checkpoint_of_an_overlapped_round_waits_for_its_evaluation(
    tiny_hdf5: Path, tmp_path: Path
) -> None:
    """Round r's checkpoint is written once r's evaluation is booked (before round r+2)."""
    tracker, rows, _ = _drive(tiny_hdf5, tmp_path / "run", overlap=True, rounds=3)

    saved = load_checkpoint(tmp_path / "run")

    assert saved["round"] == 2 and [r["round"] for r in rows.rows] == [1, 2]
    better = [r for r in rows.rows if r["val_macro_ap"] > tracker.initial_val["val_macro_ap"]]
    best = max(better, key=lambda r: r["val_macro_ap"])["round"] if better else 0
    assert saved["tracker"]["best"]["round"] == best  # round 2's evaluation included
    tracker.close()


@pytest.mark.parametrize("overlap", [False, True])
def test_divergence_on_val_stops_before_the_next_round_is_sent(
    tiny_hdf5: Path, tmp_path: Path, overlap: bool
) -> None:
    """NaN weights in round 2: serial evaluation stops at round 2; overlapped evaluation
    learns it while round 3 trains and stops then, before round 4. Either way round 2 is
    the last logged, and no checkpoint holds the diverged model."""
    tracker, rows, stops = _drive(tiny_hdf5, tmp_path / "run", overlap, rounds=5, nan_round=2)

    assert stops == ([False, True] if not overlap else [False, False, True])
    assert [r["round"] for r in rows.rows] == [1, 2]
    assert tracker.diverged and tracker.diverged_round == 2
    assert load_checkpoint(tmp_path / "run")["round"] == 1
    tracker.abandon(LoopOutcome(rounds_done=len(stops)), str(tracker.diverged))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rounds"] == 2


@pytest.mark.slow  # two real runs through Ray (~1-2 min)
def test_overlapped_run_equals_serial_run(run_overrides: list[str], tmp_path: Path) -> None:
    """End to end (Flower + Ray, federated evaluation on val users as well)."""
    common = [*run_overrides, "num_rounds=3", "eval.federated_cohort=3"]
    rows = []
    for overlap in ("false", "true"):
        out = tmp_path / overlap
        run_experiment(compose_config([*common, f"eval.overlap={overlap}"]), out)
        rows.append([_learning(r) for r in metrics_rows(out)])

    assert [r["round"] for r in rows[1]] == [1, 2, 3]
    assert all("val_macro_ap" in r and "fedval_macro_ap" in r for r in rows[1])
    assert rows[1] == rows[0]


@pytest.mark.slow  # three real runs through Ray in subprocesses (~2-3 min)
def test_killed_overlapped_run_resumes_exactly(run_overrides: list[str], tmp_path: Path) -> None:
    """SIGKILL mid-run (round 2 checkpointed while round 3 trains or is evaluated), resume:
    the rows equal an uninterrupted serial run's, none lost or logged twice."""
    args = [*run_overrides, "num_rounds=5", "checkpoint_every=1", "eval_every=1"]
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    serial = _run([*args, "eval.overlap=false", f"hydra.run.dir={full}"])
    serial_output = serial.communicate(timeout=600)[0]
    assert serial.returncode == 0, serial_output[-3000:]

    process = _run([*args, "eval.overlap=true", f"hydra.run.dir={interrupted}"])
    _kill_after_round(process, interrupted, last=2)
    resume_and_compare(run_overrides, full, interrupted, tmp_path)
    assert (interrupted / CHECKPOINT_NAME).is_file()
