"""The local Ray node a run starts: its settings, and its side processes kept out of the way.

`ray.init` on a machine without a cluster starts, besides the GCS and the raylet that a
simulation needs, five side processes: the dashboard head (a minimal API server even with
`include_dashboard=False`), the autoscaler monitor, the log monitor (it forwards the actors'
output to the driver: `log_to_driver`), and, started by the raylet, the DashboardAgent and the
RuntimeEnvAgent. `ray.init` has no public argument that skips any of them (`no_monitor` and
`include_log_monitor` exist only on Ray's private node parameters, the agents are always
started by the raylet), so they are kept: at the lowest priority (nice 19), where they take
no CPU the clients could use.

A local start gets `worker_niceness` (an attached cluster keeps its own, set at `ray start`):
Ray starts its workers (the client actors) at nice 15, far below the driver (nice 0), so on a
busy machine the clients starve while the driver waits for them. The run passes
`simulation.actor_niceness` (added to the driver's own niceness; 0: the driver's priority).

A SIGKILLed driver takes its GCS and raylet with it (Ray's kernel fate-sharing), but the
agents, on seeing their raylet gone, report that to the dead GCS and wait Ray's reconnect
timeout (60 s) before exiting. `start_reaper` starts a small process (ray_reaper.py) that
kills them as soon as the driver is gone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SIDE_NICENESS = 19  # the lowest priority: side processes run only on otherwise idle CPU
# node.all_processes keys (ray_constants.PROCESS_TYPE_*) of the side processes the driver
# starts; the agents are the raylet's children, found by their process titles.
SIDE_TYPES = ("monitor", "dashboard", "log_monitor")
AGENT_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def is_local_start(init_args: dict[str, Any]) -> bool:
    """Whether `ray.init(**init_args)` starts a node of its own (no cluster to attach to)."""
    return init_args.get("address") in (None, "", "local")


def local_init_args(init_args: dict[str, Any], actor_niceness: int | None) -> dict[str, Any]:
    """`init_args` with the actor niceness for a local start (unchanged for an attached
    cluster, or for None: Ray's own)."""
    if not is_local_start(init_args) or actor_niceness is None:
        return init_args
    system_config = {**(init_args.get("_system_config") or {}), "worker_niceness": actor_niceness}
    return {**init_args, "_system_config": system_config}


def side_processes(node: Any) -> dict[int, str]:
    """pid -> name of the side processes of a local Ray node (`worker._global_node`)."""
    found: dict[int, str] = {}
    for kind in SIDE_TYPES:
        for info in node.all_processes.get(kind, []):
            found[info.process.pid] = kind
    for info in node.all_processes.get("raylet", []):
        for pid in _children(info.process.pid):
            title = _cmdline(pid)
            if title.startswith(AGENT_TITLES):
                found[pid] = title.split()[0]
    return found


def lower_priority(pids: dict[int, str], niceness: int = SIDE_NICENESS) -> list[str]:
    """Renice every thread of these processes to `niceness` (Linux nice is per thread:
    `renice` of a pid alone leaves the threads it already started); returns the names done."""
    done = []
    for pid, name in pids.items():
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").glob("*")] or [pid]
        try:
            for tid in tids:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except (ProcessLookupError, PermissionError) as err:
            log.debug("could not renice %s (%d): %s", name, pid, err)
            continue
        done.append(name)
    return done


_REAPERS: list[subprocess.Popen[bytes]] = []  # this process's; their stdin open while it lives


def start_reaper(pids: dict[int, str]) -> None:
    """Start a reaper (ray_reaper.py) that kills `pids` once this process is gone; an earlier
    one (a previous job's Ray, already shut down) is let go: it reaps now and exits."""
    for old in _REAPERS:
        if old.stdin is not None:
            old.stdin.close()
    _REAPERS.clear()
    targets = [f"{pid}:{start}" for pid in pids if (start := _start_time(pid)) is not None]
    if targets:
        reaper = subprocess.Popen(
            [sys.executable, "-m", "flair_fl.federated.ray_reaper", *targets],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            close_fds=True,
        )
        _REAPERS.append(reaper)


def _start_time(pid: int) -> str | None:
    from flair_fl.federated.ray_reaper import start_time

    return start_time(pid)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (a /proc scan: /proc/PID/task/*/children needs a kernel
    option that not every kernel has)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return ""
