"""Signals stop a run cleanly: real child processes, real signals, real Ray.

A run sent SIGINT (as Ctrl-C: the whole process group) or SIGTERM mid-round exits 130 / 143
within seconds, its checkpoint loads and matches its metrics, and it leaves no shared-memory
files and no Ray process behind. A driver killed outright (SIGKILL) takes its local Ray
cluster with it; the shared-memory files it could not remove go with the next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flair_fl.artifacts.checkpoint import load_checkpoint
from flair_fl.federated.transport import HOST_FILE, SharedTransport, default_shared_root
from tests.conftest import CACHE_DIR
from tests.helpers import metrics_rows

REPO = Path(__file__).resolve().parents[1]


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            start = _start_time(child)
            if start is not None:
                found[child] = start
                todo.append(child)
    return found


def _start_time(pid: int) -> str | None:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split())[19]
    except OSError:
        return None


def _still_running(processes: dict[int, str], wait_s: float = 20.0) -> list[str]:
    """The command lines of `processes` still running after up to `wait_s` (Ray's
    processes exit as their driver goes, some after a moment)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [pid for pid, start in processes.items() if _start_time(pid) == start]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return [Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:200] for pid in alive]


SIDE_PROCESSES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "monitor.py", "dashboard.py")


def _niceness_by_kind(processes: dict[int, str]) -> dict[str, set[int]]:
    """The niceness of the client actors and of Ray's side processes among `processes`."""
    found: dict[str, set[int]] = {"actor": set(), "side": set()}
    for pid in processes:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            nice = os.getpriority(os.PRIO_PROCESS, pid)
        except OSError:
            continue
        if command.startswith("ray::ClientAppActor"):
            found["actor"].add(nice)
        elif any(name in command for name in SIDE_PROCESSES):  # log_monitor.py too
            found["side"].add(nice)
    return found


@pytest.fixture
def ray_temp() -> Iterator[Path]:
    """A short temp dir for the run's own Ray (its socket paths must stay < 108 chars)."""
    path = Path(tempfile.mkdtemp(prefix="ffray", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _start_run(run_dir: Path, ray_temp: Path, *extra: str) -> subprocess.Popen[str]:
    """A tiny run with its own local Ray cluster, in its own process group."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flair_fl.run",
            "debug=tiny",
            "num_rounds=500",
            "checkpoint_every=1",
            f"data.cache_dir={CACHE_DIR}",
            f"hydra.run.dir={run_dir}",
            f"+simulation.backend.init_args._temp_dir={ray_temp}",
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_rounds(process: subprocess.Popen[str], run_dir: Path, rounds: int) -> None:
    deadline = time.monotonic() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rounds:
            return
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.2)
    raise AssertionError("the run did not get to round 2")


def _shm_files(pid: int) -> list[Path]:
    return sorted(default_shared_root().glob(f"flair_fl-{pid}-*"))


@pytest.mark.parametrize(
    ("sig", "to_group", "status", "extra"),
    [
        (signal.SIGINT, True, 130, ()),
        (signal.SIGTERM, False, 143, ()),
        # a round still being evaluated in the background is booked, then checkpointed
        (signal.SIGINT, True, 130, ("eval.overlap=true", "eval_every=1")),
    ],
    ids=["ctrl-c", "sigterm", "ctrl-c-overlapped-eval"],
)
@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_signal_mid_round_stops_the_run_cleanly(
    sig: signal.Signals,
    to_group: bool,
    status: int,
    extra: tuple[str, ...],
    tmp_path: Path,
    ray_temp: Path,
) -> None:
    # Prepare: a run two rounds in, with its Ray processes
    run_dir = tmp_path / "run"
    process = _start_run(run_dir, ray_temp, *extra)
    _wait_for_rounds(process, run_dir, 2)
    ray_processes = _descendants(process.pid)
    assert ray_processes and _shm_files(process.pid)

    # Execute: as Ctrl-C does (SIGINT to the whole group) or a scheduler (SIGTERM to the pid)
    sent = time.monotonic()
    if to_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    output = process.communicate(timeout=120)[0]
    took = time.monotonic() - sent

    # Assert: the signal's status within seconds, a checkpoint of the last logged round,
    # and nothing left behind
    assert process.returncode == status, output[-3000:]
    assert took < 30, f"took {took:.1f} s to stop"
    assert f"stopped by {sig.name}" in output and "Traceback" not in output
    checkpoint = load_checkpoint(run_dir)
    rows = metrics_rows(run_dir)
    assert checkpoint["round"] == rows[-1]["round"] >= 2
    assert not (run_dir / "results.json").exists()  # not finished: a resume continues it
    assert _shm_files(process.pid) == []
    assert _still_running(ray_processes) == []


@pytest.mark.slow  # a real run through its own Ray (~30-60 s)
def test_killed_driver_takes_its_ray_processes_and_next_run_removes_its_files(
    tmp_path: Path, ray_temp: Path
) -> None:
    # Prepare: a run two rounds in
    run_dir = tmp_path / "run"
    process = _start_run(run_dir, ray_temp)
    _wait_for_rounds(process, run_dir, 2)
    ray_processes = _descendants(process.pid)
    niceness = _niceness_by_kind(ray_processes)

    # Execute: SIGKILL the driver alone (no handler runs)
    process.kill()
    process.communicate(timeout=60)
    left_files = _shm_files(process.pid)
    SharedTransport().close()  # what the next run's transport does first

    # Assert: the actors ran at the driver's priority, Ray's side processes at the lowest;
    # all of them went with the driver
    assert niceness["actor"] == {os.getpriority(os.PRIO_PROCESS, os.getpid())}, niceness
    assert niceness["side"] == {19}, niceness
    assert _still_running(ray_processes) == []
    assert left_files, "a SIGKILLed run cannot remove its files"
    assert _shm_files(process.pid) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_new_transport_removes_the_files_of_dead_runs_of_this_host(tmp_path: Path) -> None:
    # Prepare: directories of a dead run, a live one, and a dead pid of another host
    dead, live, foreign = (
        tmp_path / f"flair_fl-{_dead_pid()}-aaaa",
        tmp_path / f"flair_fl-{os.getpid()}-bbbb",
        tmp_path / f"flair_fl-{_dead_pid()}-cccc",
    )
    for path in (dead, live, foreign):
        path.mkdir()
        (path / "train.f32").write_bytes(b"\0" * 64)
    (foreign / HOST_FILE).write_text("another-node")

    # Execute
    transport = SharedTransport(tmp_path)
    transport.close()

    # Assert
    assert not dead.exists()
    assert live.exists() and foreign.exists()
    assert not transport.dir.exists()


def _python(code: str, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


STUCK_RUN = """
import time
from pathlib import Path
from flair_fl.services import stopping

with stopping.handling(grace_s={grace}):
    stopping.add_stop_hook(lambda: Path("{out}/hook").write_text("ran"))
    stopping.add_cleanup(lambda: Path("{out}/cleanup").write_text("ran"))
    print("ready", flush=True)
    time.sleep(120)  # a call that never polls the stop flag
"""


@pytest.mark.parametrize(
    ("grace", "signals", "status"),
    [(1.0, [signal.SIGTERM], 143), (60.0, [signal.SIGINT, signal.SIGINT], 130)],
    ids=["grace-expires", "second-signal"],
)
def test_a_run_that_does_not_stop_is_ended_after_cleanups(
    grace: float, signals: list[signal.Signals], status: int, tmp_path: Path
) -> None:
    # Prepare: a process stuck where no stop flag is polled
    child = _python(STUCK_RUN.format(grace=grace, out=tmp_path), tmp_path)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"

    # Execute
    sent = time.monotonic()
    for sig in signals:
        child.send_signal(sig)
        time.sleep(0.3)
    output = child.communicate(timeout=60)[0]

    # Assert: the hooks ran, the status is the signal's, long before the sleep ends
    assert child.returncode == status, output
    assert time.monotonic() - sent < 20
    assert (tmp_path / "hook").read_text() == "ran"
    assert (tmp_path / "cleanup").read_text() == "ran"
    assert "exiting now" in output


def test_a_signal_maps_to_its_status_and_handlers_come_back() -> None:
    from flair_fl.services import stopping

    before = signal.getsignal(signal.SIGTERM)
    with stopping.handling():
        assert stopping.requested() is None
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    statuses = {s.name: s.exit_code for s in stopping.STOP_SIGNALS.values()}
    assert statuses.items() >= {"SIGINT": 130, "SIGTERM": 143}.items()


def test_outside_a_run_handlers_are_left_to_the_caller() -> None:
    # An in-process caller of run_experiment (no handling()): start_ray re-installing the
    # run's handlers after ray.init would leave them installed for good
    from flair_fl.services import stopping

    before = signal.getsignal(signal.SIGTERM)

    stopping.install_handlers()

    assert signal.getsignal(signal.SIGTERM) is before
