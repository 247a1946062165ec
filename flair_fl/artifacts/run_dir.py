"""What a run directory says about its run: who is running in it (the lock) and whether the
run is finished (`results.json`: its headline numbers, written last by `write_results`).

One run per run dir: a run (or a resume) takes `<run dir>/run.lock`, an exclusive `flock` on
a file holding the holder's pid, host and start time, and gives it back when it ends. A
second run into the same dir is refused, naming the holder. The kernel drops a `flock` when
its process dies, however it dies; a lock file left by a dead process of this machine is
taken over with a warning. A lock naming another host (a run dir on a shared file system,
e.g. under SLURM) is never taken over: that host's process cannot be checked from here. The
message says how to clear it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flair_fl.artifacts.durable import write_atomically
from flair_fl.errors import ConfigError, RunDirBusy
from flair_fl.services.processes import pid_alive, this_host

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
# Written last, when everything else of a run is: its presence means the run is finished.
RESULTS_NAME = "results.json"


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')}: {holder.get('command', '?')}"
    )


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder written in the lock file; None if empty, {} if unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _refuse_or_take_over(path: Path, holder: dict[str, Any]) -> None:
    """Decide on a lock file whose flock is free: refuse a live or foreign holder, warn and
    go on for a dead one."""
    host, pid = holder.get("host"), holder.get("pid")
    if host not in (None, this_host()):
        raise RunDirBusy(
            f"{path}: held by {_describe(holder)}; that host's process cannot be checked "
            f"from {this_host()}. If that run is no longer running, delete {path}"
        )
    if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
        raise RunDirBusy(
            f"{path}: held by {_describe(holder)}, which is still running; wait for it or "
            f"stop it (kill -INT {pid}), or use another run dir"
        )
    log.warning("%s: taking over the stale lock of %s (no longer running)", path, _describe(holder))


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[Path]:
    """Hold `<run_dir>/run.lock` while the block runs (see the module doc)."""
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(
                f"{path}: another run is using {run_dir} ({_describe(holder or {})}); "
                "wait for it or stop it, or use another run dir"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # else the holder removed the file as we opened it: take the new one
        os.close(fd)
    try:
        holder = _read_holder(fd)
        if holder is not None:
            _refuse_or_take_over(path, holder)
        me = {
            "pid": os.getpid(),
            "host": this_host(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before the flock goes: a waiting run then creates a new file
        os.close(fd)


def report_finished(run_dir: Path) -> dict[str, Any] | None:
    """If the run in `run_dir` is finished, say so in one line and return its summary."""
    done = finished_summary(run_dir)
    if done is not None:
        print(
            f"flair-fl: {run_dir} is finished ({done['rounds']} rounds): nothing to resume, "
            "its results stay as they are",
            flush=True,
        )
    return done


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The flat summary of a finished run (from its results.json, written last), or None
    if the run is not finished."""
    path = run_dir / RESULTS_NAME
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path}: unreadable ({err}); the run may be finished. Move it aside to resume"
        ) from None
    if not isinstance(results, dict):
        raise ConfigError(f"{path}: not a run's results; move it aside to resume")
    summary: dict[str, Any] = {
        k: results.get(k) for k in ("rounds", "best_round", "stop_reason", "wall_time_s")
    }
    for group in ("untrained", "best", "final", "privacy"):
        for key, value in (results.get(group) or {}).items():
            summary[f"{group}_{key}"] = value
    return summary


def write_results(summary: dict[str, Any], out: Path) -> None:
    """`results.json`: the run's headline numbers grouped by model (untrained, best-val,
    final) and split, next to the flat `summary.json` the loggers write. Written last: it
    marks the run finished (a resume then leaves the run dir as it is)."""
    groups: dict[str, dict[str, Any]] = {"untrained": {}, "best": {}, "final": {}}
    for key, value in summary.items():
        prefix, _, rest = key.partition("_")
        if prefix in groups and rest:
            groups[prefix][rest] = value
    results = {
        "rounds": summary.get("rounds"),
        "best_round": summary.get("best_round"),
        "stop_reason": summary.get("stop_reason"),
        **groups,
        "privacy": {
            k[len("privacy_") :]: v for k, v in summary.items() if k.startswith("privacy_")
        },
        "wall_time_s": summary.get("wall_time_s"),
    }
    write_atomically(out / RESULTS_NAME, json.dumps(results, indent=2, default=str))
