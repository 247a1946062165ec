"""One run per run dir (the lock), and a finished run that is resumed stays as it is."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flair_fl.artifacts.run_dir import LOCK_NAME, run_dir_lock
from flair_fl.errors import RunDirBusy
from flair_fl.services.processes import this_host
from tests.conftest import CACHE_DIR

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from pathlib import Path\n"
HOLD += "from flair_fl.artifacts.run_dir import run_dir_lock\n"
HOLD += "with run_dir_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(900)\n"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flair_fl.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _plant(run_dir: Path, **holder: object) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))


def test_a_second_run_into_a_held_run_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    # Prepare: another process holds the run dir's lock
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

        # Execute: a run into that dir, through the CLI
        done = _cli("debug=tiny", f"hydra.run.dir={tmp_path}", f"data.cache_dir={CACHE_DIR}")
    finally:
        holder.kill()
        holder.wait()

    # Assert: one line, status 2, naming the holder's pid; before any data or Ray
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"pid {holder.pid}" in errors[0], done.stderr
    assert not (tmp_path / "config_resolved.yaml").exists()  # refused before it read its data


def test_a_lock_naming_a_live_pid_is_refused(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "900"])
    try:
        _plant(tmp_path, pid=sleeper.pid, host=this_host(), started="x", command="sleep")
        with (
            pytest.raises(RunDirBusy, match=rf"pid {sleeper.pid} .*still running"),
            run_dir_lock(tmp_path),
        ):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the lock file of a run that was SIGKILLed
    dead = _dead_pid()
    _plant(tmp_path, pid=dead, host=this_host(), started="x", command="killed run")

    # Execute
    with caplog.at_level(logging.WARNING), run_dir_lock(tmp_path) as path:
        held = json.loads(path.read_text())

    # Assert: ours while held, gone after, the take-over said
    assert held["pid"] == os.getpid() and held["host"] == this_host()
    assert not path.exists()
    assert f"pid {dead}" in caplog.text and "stale lock" in caplog.text


def test_a_lock_of_another_host_is_never_taken_over(tmp_path: Path) -> None:
    _plant(tmp_path, pid=_dead_pid(), host="gpu-node-17", started="x", command="run")

    busy = r"gpu-node-17.*delete .*run\.lock"
    with pytest.raises(RunDirBusy, match=busy), run_dir_lock(tmp_path):
        pass
    assert (tmp_path / LOCK_NAME).exists()


def _digests(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def attach(ray_head: str | None) -> list[str]:
    """Overrides attaching to the session's Ray head (a resume must give them again)."""
    if not ray_head:
        return []
    return [
        f"+simulation.backend.init_args.address={ray_head}",
        "~simulation.backend.init_args.include_dashboard",
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, attach: list[str]) -> Path:
    """A finished tiny run (through the real simulation), made once for this module."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = _cli("debug=tiny", f"data.cache_dir={CACHE_DIR}", f"hydra.run.dir={run_dir}", *attach)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_resuming_a_finished_run_says_so_and_changes_nothing(
    finished_run: Path, tmp_path: Path
) -> None:
    before = _digests(finished_run)

    done = _cli(f"resume={finished_run}", f"hydra.run.dir={tmp_path / 'resume'}")

    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("flair-fl")]
    assert lines == [lines[0]] and "is finished" in lines[0], done.stdout
    assert _digests(finished_run) == before


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_a_run_killed_after_its_last_checkpoint_finishes_with_that_model(
    finished_run: Path, attach: list[str], tmp_path: Path
) -> None:
    # Prepare: the same run as if killed during its final evaluation
    run_dir = tmp_path / "killed"
    shutil.copytree(finished_run, run_dir)
    for name in ("results.json", "summary.json", "model_final.pt"):
        (run_dir / name).unlink()

    # Execute
    done = _cli(f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'resume'}", *attach)

    # Assert: the final model and numbers are the uninterrupted run's
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "model_final.pt").read_bytes() == (
        finished_run / "model_final.pt"
    ).read_bytes()
    expected = json.loads((finished_run / "results.json").read_text())
    got = json.loads((run_dir / "results.json").read_text())
    assert got["final"] == expected["final"] and got["rounds"] == expected["rounds"]
