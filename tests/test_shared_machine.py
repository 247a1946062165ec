"""A run on a shared machine: quick answers, quiet logs, fair priorities.

`--help` and a config error answer without importing torch, Ray or Flower (real subprocess,
Python's own import trace); log files carry no ANSI codes; a failed client's console line is
its error's last line; a local Ray start gets the run's actor niceness, an attached cluster
keeps its own; Ray's side processes are reniced thread by thread (a real process).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flair_fl.federated import ray_node
from flair_fl.federated.exchange import last_line
from flair_fl.loggers.console import ConsoleProgress
from flair_fl.services.log_format import PlainFormatter

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "ray", "flwr", "numpy", "h5py", "opacus")


def _imported(stderr: str) -> set[str]:
    """Top-level packages in a `python -X importtime` trace."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rpartition("|")[2].strip().split(".")[0])
    return names


@pytest.mark.parametrize(
    ("args", "status"),
    [(["--help"], 0), (["+client.bogus=1"], 2), (["num_rounds=0"], 2)],
    ids=["help", "unknown-key", "bad-value"],
)
def test_help_and_config_errors_answer_without_torch_ray_or_flower(
    args: list[str], status: int, tmp_path: Path
) -> None:
    # Prepare
    command = [sys.executable, "-X", "importtime", "-m", "flair_fl.run", *args]
    command.append(f"hydra.run.dir={tmp_path / 'run'}")

    # Execute
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )

    # Assert: the answer, and none of the heavy packages imported for it
    assert done.returncode == status, done.stderr[-2000:]
    assert "import time:" in done.stderr, "the import trace is what this test reads"
    assert _imported(done.stderr) & set(HEAVY) == set()
    if status == 2:
        errors = [line for line in done.stderr.splitlines() if not line.startswith("import")]
        assert len(errors) == 1 and errors[0].startswith("flair-fl: error: "), errors
        assert ("client.bogus" if "bogus" in args[0] else "num_rounds") in errors[0]


def test_log_files_get_no_ansi_codes_from_message_or_traceback() -> None:
    # Prepare: a record as Ray and Flower make them (a coloured actor name and level)
    try:
        raise RuntimeError("\x1b[36mray::ClientAppActor.run()\x1b[39m failed")
    except RuntimeError:
        record = logging.LogRecord(
            "flwr", logging.ERROR, __file__, 1, "\x1b[93m%s\x1b[0m", ("boom",), sys.exc_info()
        )

    # Execute
    text = PlainFormatter().format(record)

    # Assert
    assert "\x1b" not in text
    assert "boom" in text and "ray::ClientAppActor.run() failed" in text


def test_a_failed_clients_console_line_is_its_errors_last_line() -> None:
    reason = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad user\n\n'

    assert last_line(reason) == "ValueError: bad user"
    assert last_line("x" * 500).endswith("...") and len(last_line("x" * 500)) == 200


def test_console_elapsed_is_the_metrics_clock() -> None:
    progress = ConsoleProgress(5)

    line = progress.line(1, {"train_loss": 0.5, "elapsed_s": 125.4})

    assert "elapsed 02:05" in line


def test_a_local_start_gets_the_actor_niceness_and_an_attached_cluster_keeps_its_own() -> None:
    # Prepare
    local = {"include_dashboard": False, "_system_config": {"object_spilling_threshold": 0.9}}
    attached = {"address": "10.0.0.1:6379"}

    # Execute
    started = ray_node.local_init_args(local, 0)
    kept = ray_node.local_init_args(attached, 0)

    # Assert
    assert started["_system_config"] == {"object_spilling_threshold": 0.9, "worker_niceness": 0}
    assert kept == attached
    assert ray_node.local_init_args({"address": "local"}, None) == {"address": "local"}


THREADED = """
import threading, time
for _ in range(3):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"""


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_side_processes_are_reniced_in_every_thread() -> None:
    # Prepare: a real process with four threads, as Ray's agents have
    child = subprocess.Popen([sys.executable, "-c", THREADED], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        tids = [int(t.name) for t in Path(f"/proc/{child.pid}/task").iterdir()]
        assert len(tids) >= 4

        # Execute
        done = ray_node.lower_priority({child.pid: "agent", 2**22 + 7: "gone"})

        # Assert: every thread at 19; a process that is gone is skipped
        deadline = time.monotonic() + 5
        while {_nice(t) for t in tids} != {19} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {_nice(t) for t in tids} == {19}
        assert done == ["agent"]
    finally:
        child.kill()
        child.wait()
