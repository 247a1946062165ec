"""Checkpoints and exact resume: a run killed mid-way and resumed gives the same per-round
metrics as an uninterrupted one; an interrupted checkpoint write keeps the previous one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flair_fl.artifacts.checkpoint import (
    CHECKPOINT_NAME,
    atomic_save,
    differing_keys,
    load_checkpoint,
)
from flair_fl.errors import ConfigError
from flair_fl.federated.round import is_measurement
from flair_fl.modes.federated import run_experiment
from tests.helpers import compose_config, metrics_rows
from tests.test_adaptive_mu import pfl_mu_sequence

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flair_fl.run", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )  # type: ignore[call-overload]


def _kill_after_round(process: subprocess.Popen[str], run_dir: Path, last: int) -> None:
    """Preemption: SIGKILL the whole run once round `last` is checkpointed."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        path = run_dir / CHECKPOINT_NAME
        if path.is_file() and torch.load(path, weights_only=True)["round"] >= last:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        time.sleep(0.2)
    raise AssertionError("run did not reach the round to kill at")


def resume_and_compare(
    run_overrides: list[str], full: Path, interrupted: Path, tmp_path: Path
) -> list[dict[str, object]]:
    """Resume `interrupted` and check its per-round metrics equal the uninterrupted `full`
    run's (measurements aside); returns full's rows. The Ray head's address is given again:
    resume takes no `+` key from a run dir."""
    resumed = _run(
        [*run_overrides, f"resume={interrupted}", f"hydra.run.dir={tmp_path / 'unused'}"]
    )
    output = resumed.communicate(timeout=600)[0]

    assert resumed.returncode == 0, output[-3000:]
    assert "resuming" in output
    expected, got = metrics_rows(full), metrics_rows(interrupted)
    assert [r["round"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(expected, got, strict=True):
        for key in (k for k in a if not is_measurement(k)):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["round"], key)
    return expected


ADAFEDPROX = ["strategy=adafedprox", "strategy.proximal_mu=0.5", "strategy.adaptive_mu.every=1"]


@pytest.mark.slow  # three real runs through Ray in subprocesses (~1 min)
@pytest.mark.parametrize("strategy", [["strategy=fedadam"], ADAFEDPROX], ids=["fedadam", "ada"])
def test_killed_and_resumed_run_equals_uninterrupted(
    strategy: list[str], run_overrides: list[str], tmp_path: Path
) -> None:
    args = [
        *run_overrides,
        *strategy,
        "num_rounds=5",
        "checkpoint_every=1",
        "eval_every=1",
    ]
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    assert _run([*args, f"hydra.run.dir={full}"]).wait(timeout=600) == 0

    process = _run([*args, f"hydra.run.dir={interrupted}"])
    _kill_after_round(process, interrupted, last=2)
    expected = resume_and_compare(run_overrides, full, interrupted, tmp_path)
    if strategy == ADAFEDPROX:  # mu of each round: pfl-research's rule on the val losses
        untrained = json.loads((full / "summary.json").read_text())["untrained_val_loss"]
        losses = [untrained] + [r["val_loss"] for r in expected]
        mus = pfl_mu_sequence(losses, initial=0.5, step=0.1, decrease_after=1)
        assert [r["proximal_mu"] for r in expected] == pytest.approx(mus[:-1], abs=1e-12)
    final_a = torch.load(full / "model_final.pt")
    final_b = torch.load(interrupted / "model_final.pt")
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    keys = ("arrays", "strategy", "privacy", "tracker", "initial_val", "config")
    atomic_save({"round": 3, **{key: {} for key in keys}}, path)

    class Unpicklable:
        def __reduce__(self) -> object:
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_save({"round": 4, "payload": Unpicklable()}, path)

    assert load_checkpoint(tmp_path)["round"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no half-written file


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_resume_with_a_changed_key_is_refused_with_the_keys(
    run_overrides: list[str], tmp_path: Path
) -> None:
    cfg = compose_config([*run_overrides, "num_rounds=1"])
    run_experiment(cfg, tmp_path)
    (tmp_path / "results.json").unlink()  # as if killed in its final evaluation: resumable

    changed = compose_config(
        [
            *run_overrides,
            "num_rounds=1",
            "client.lr=0.5",
            f"resume={tmp_path}",
            "simulation.round_timeout=99",
        ]
    )
    with pytest.raises(ConfigError, match=r"client\.lr") as err:
        run_experiment(changed, tmp_path / "other")
    assert "simulation" not in str(err.value)  # resources may change on resume


def test_differing_keys_ignores_neutral_ones() -> None:
    saved = {"seed": 0, "client": {"lr": 0.1}, "simulation": {"x": 1}, "device": "cpu"}
    current = {"seed": 1, "client": {"lr": 0.1}, "simulation": {"x": 2}, "device": "cuda"}
    assert differing_keys(saved, current) == ["seed"]
    # dp_bmf's cache of its strategy matrix may move; its factorization may not
    saved["privacy"] = {"factorization_cache": "/a", "factorization": "optimized"}
    current["privacy"] = {"factorization_cache": "/b", "factorization": "sqrt"}
    assert differing_keys(saved, current) == ["privacy.factorization", "seed"]


def test_a_checkpoint_naming_a_moved_target_resumes() -> None:
    # Written before flair-fl's modules moved into packages: same function, old path.
    saved = {"mode": {"_target_": "flair_fl.experiment.run_experiment"}, "seed": 0}
    current = {"mode": {"_target_": "flair_fl.modes.federated.run_experiment"}, "seed": 0}
    assert differing_keys(saved, current) == []
    other = {"mode": {"_target_": "flair_fl.modes.centralized.run_central"}, "seed": 0}
    assert differing_keys(saved, other) == ["mode._target_"]


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no checkpoint\.pt"):
        load_checkpoint(tmp_path)
