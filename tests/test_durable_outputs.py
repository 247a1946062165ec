"""A full disk while writing outputs leaves the previous files intact and says so.

The disk is "filled" for real, with no mock: each scenario runs in a child process whose
file size limit (`resource.setrlimit(RLIMIT_FSIZE, ...)`) is set just above what the files
hold, with SIGXFSZ ignored, so the kernel fails the write that would grow a file past it
with OSError(EFBIG), exactly where a full disk fails with ENOSPC. The child prints the error
and exits without closing anything (as a killed run would); the test then reads what is on
disk.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import metrics_rows

REPO = Path(__file__).resolve().parents[1]

LIMIT = '''
import resource, signal

def limit_file_size(extra: int) -> None:
    """Files may grow at most `extra` bytes past the largest file in `out`."""
    largest = max(p.stat().st_size for p in out.iterdir())
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest + extra, largest + extra))
'''


def run_child(out: Path, body: str) -> str:
    """Run `body` in a fresh interpreter (with `out` and `limit_file_size`); its stdout."""
    script = f"from pathlib import Path\nout = Path({str(out)!r})\n{LIMIT}\n{textwrap.dedent(body)}"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_metrics_append_on_a_full_disk_keeps_earlier_lines(tmp_path: Path) -> None:
    # Prepare: two rounds logged, then the disk fills; the third round's line is long
    body = """
    import os
    from flair_fl.loggers.files import FileLogger

    logger = FileLogger(out)
    logger.log_round(1, {"loss": 0.5, "acc": 0.25})
    logger.log_round(2, {"loss": 0.4, "acc": 0.5})
    limit_file_size(extra=10)
    try:
        logger.log_round(3, {"loss": 0.3, "acc": 0.75, "note": "x" * 200})
    except OSError as err:
        print(err, flush=True)
    os._exit(0)  # no close, no flush at exit: only what each round wrote is on disk
    """

    # Execute
    message = run_child(tmp_path, body)

    # Assert: the error names the file, earlier lines parse, the partial line is gone
    assert str(tmp_path / "metrics.jsonl") in message and "the disk is full" in message
    assert [row["round"] for row in metrics_rows(tmp_path)] == [1, 2]
    with (tmp_path / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["round"] for row in rows] == ["1", "2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl"]


def test_csv_append_on_a_full_disk_keeps_earlier_rows(tmp_path: Path) -> None:
    # Prepare: many declared columns make the CSV (long header, rows of commas) the largest
    # file, so its append is the one that hits the limit while the JSONL line still fits
    body = """
    import os
    from flair_fl.loggers.files import FileLogger

    logger = FileLogger(out, columns=[f"metric_{i:02d}_with_a_long_name" for i in range(30)])
    logger.log_round(1, {"metric_00_with_a_long_name": 0.5})
    logger.log_round(2, {"metric_00_with_a_long_name": 0.4})
    limit_file_size(extra=5)
    try:
        logger.log_round(3, {"metric_00_with_a_long_name": 0.3})
    except OSError as err:
        print(err, flush=True)
    os._exit(0)
    """

    # Execute
    message = run_child(tmp_path, body)

    # Assert: the CSV keeps its header and two whole rows
    assert str(tmp_path / "metrics.csv") in message and "the disk is full" in message
    with (tmp_path / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["metric_00_with_a_long_name"] for row in rows] == ["0.5", "0.4"]
    assert all(len(row) == 31 and None not in row for row in rows)


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path: Path) -> None:
    # Prepare: a small checkpoint exists; the next one is 400 kB, past the limit
    body = """
    import torch
    from flair_fl.artifacts.checkpoint import atomic_save

    atomic_save({"round": 1, "w": torch.ones(10)}, out / "checkpoint.pt")
    limit_file_size(extra=100_000)
    try:
        atomic_save({"round": 2, "w": torch.zeros(100_000)}, out / "checkpoint.pt")
    except OSError as err:
        print(err, flush=True)
    """

    # Execute
    message = run_child(tmp_path, body)

    # Assert: the old checkpoint loads unchanged and no temporary file is left
    assert str(tmp_path / "checkpoint.pt") in message and "the disk is full" in message
    saved = torch.load(tmp_path / "checkpoint.pt")
    assert saved["round"] == 1 and torch.equal(saved["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_results_on_a_full_disk_keep_the_previous_file(tmp_path: Path) -> None:
    # Prepare: results.json of an earlier write; the new one is far larger than the limit
    body = """
    from flair_fl.artifacts.run_dir import write_results

    write_results({"rounds": 1, "final_val_macro_ap": 0.5}, out)
    limit_file_size(extra=50)
    try:
        write_results({"rounds": 2, **{f"final_x{i}": 0.1 for i in range(100)}}, out)
    except OSError as err:
        print(err, flush=True)
    """

    # Execute
    message = run_child(tmp_path, body)

    # Assert
    assert str(tmp_path / "results.json") in message and "the disk is full" in message
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rounds"] == 1 and results["final"] == {"val_macro_ap": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_writer_killed_mid_write_leaves_no_temporary_behind_for_long(tmp_path: Path) -> None:
    # Prepare: a real process starts a checkpoint write and is SIGKILLed before its rename;
    # a live process's temporary (a concurrent writer) must not be touched
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            f"path = {str(tmp_path)!r} + f'/.checkpoint.pt.{{os.getpid()}}.tmp'\n"
            "open(path, 'wb').write(b'half a checkpoint')\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n",
        ],
        timeout=60,
    )
    assert killed.returncode == -9
    stale = next(tmp_path.glob(".checkpoint.pt.*.tmp"))
    live = subprocess.Popen(["sleep", "60"])
    busy = tmp_path / f".checkpoint.pt.{live.pid}.tmp"
    busy.write_bytes(b"being written")
    try:
        # Execute: the next checkpoint write
        from flair_fl.artifacts.checkpoint import atomic_save

        atomic_save({"round": 2}, tmp_path / "checkpoint.pt")

        # Assert: the dead writer's temporary is gone, the live one's kept, the new file whole
        assert not stale.exists()
        assert busy.read_bytes() == b"being written"
        assert torch.load(tmp_path / "checkpoint.pt")["round"] == 2
    finally:
        live.kill()
        live.wait()


def test_resume_drops_a_torn_last_metrics_line(tmp_path: Path) -> None:
    # Prepare: rounds 1-2 whole, round 3's line cut where a kill mid-append would cut it
    from flair_fl.loggers.files import FileLogger
    from flair_fl.loggers.plots import PlotLogger

    lines = [json.dumps({"round": r, "train_loss": 1.0 / r}) for r in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:9])

    # Execute: resume after the round-2 checkpoint and log round 3 again
    files, plots = FileLogger(tmp_path), PlotLogger(tmp_path)
    for logger in (files, plots):
        logger.resume_from(2)
        logger.log_round(3, {"train_loss": 0.25})

    # Assert: every line parses, rounds 1-3 once each
    rows = metrics_rows(tmp_path)
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[2]["train_loss"] == 0.25
    assert sorted(plots.rows) == [1, 2, 3]
    with (tmp_path / "metrics.csv").open() as f:
        assert [row["round"] for row in csv.DictReader(f)] == ["1", "2", "3"]


def test_resume_refuses_metrics_damaged_before_the_last_line(tmp_path: Path) -> None:
    from flair_fl.loggers.files import FileLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')

    with pytest.raises(ValueError, match=rf"{path}: line 2 is not valid JSON"):
        FileLogger(tmp_path).resume_from(3)
