"""`python -m flair_fl.federated.ray_reaper PID:START ...`: SIGKILL these processes once the
driver that started this reaper is gone (its end of our stdin closes: exit, crash or SIGKILL).

Why (ray_node.py): a SIGKILLed driver takes its GCS and raylet with it, but the raylet's
DashboardAgent and RuntimeEnvAgent then try to report the raylet's death to the dead GCS and
wait Ray's GCS reconnect timeout (60 s) before exiting. Lowering that timeout would also make
a slow GCS on a loaded machine fatal at start-up, so the agents are ended from here instead.
A process is killed only if its start time is still the one recorded (a reused pid is left).
Standard library only: it starts in a fraction of a second and holds ~10 MB.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def main(targets: list[str]) -> None:
    """Wait for stdin's end, then kill every `PID:START` target still running."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: reap first
    sys.stdin.buffer.read()
    for target in targets:
        pid, _, start = target.partition(":")
        if start_time(int(pid)) == start:
            with contextlib.suppress(ProcessLookupError):  # it went by itself meanwhile
                os.kill(int(pid), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1:])
