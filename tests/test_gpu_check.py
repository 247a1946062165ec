"""scripts/gpu_check.sh: each step bounded, a failed step reported and the next one run;
its `--cpu` mode runs the same steps, tiny, on this machine (no GPU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
CPU_STEPS = ["machine", "gpu-tests", "simulation", "data-path", "flair-fp32", "contention"]


def _check(out: Path, python: str, seconds: int = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPU_CHECK_PYTHON": python, "GPU_CHECK_SECONDS": str(seconds)}
    return subprocess.run(
        ["bash", str(SCRIPT), "--cpu", str(out), str(out / "no-bundle")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def _steps(out: Path) -> dict[str, int]:
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return {row["step"]: row["rc"] for row in rows}


def test_failed_steps_are_reported_and_the_check_goes_on(tmp_path: Path) -> None:
    # Execute: an interpreter that does not exist, so every Python step fails
    done = _check(tmp_path, "/nonexistent/python3")

    # Assert: every step ran and was recorded; each failure named; status = failures
    steps = _steps(tmp_path)
    assert list(steps) == CPU_STEPS
    failed = [name for name, rc in steps.items() if rc != 0]
    assert failed == CPU_STEPS[1:] and done.returncode == len(failed)
    for name in failed:
        assert f"step {name} FAILED" in done.stderr
    assert (tmp_path / "logs" / "simulation.log").is_file()


def test_steps_after_the_deadline_fail_without_running(tmp_path: Path) -> None:
    done = _check(tmp_path, sys.executable, seconds=0)

    steps = _steps(tmp_path)
    assert list(steps) == CPU_STEPS and set(steps.values()) == {124}
    assert done.returncode == len(CPU_STEPS)
    assert "deadline" in (tmp_path / "logs" / "gpu-tests.log").read_text()


@pytest.mark.slow  # a Ray run, both data-path benchmarks and a bench.py run (~3-5 min)
def test_cpu_mode_runs_every_step(tmp_path: Path) -> None:
    done = _check(tmp_path, sys.executable)

    assert done.returncode == 0, done.stderr[-4000:]
    assert _steps(tmp_path) == dict.fromkeys(CPU_STEPS, 0)
    assert json.loads((tmp_path / "simulation" / "results.json").read_text())["rounds"] == 2
    for report in ("data-path", "flair-fp32", "contention"):
        assert json.loads((tmp_path / f"{report}.json").read_text())
