"""Whether a process is alive, and this machine's name: for locks and leftover files that
carry the pid (and host) of the run that made them."""

from __future__ import annotations

import os
import socket


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a zombie counts as dead:
    it no longer holds anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # no /proc (macOS): the signal check is all there is
        return True


def this_host() -> str:
    """This machine's name, as written into locks (compared, never resolved)."""
    return socket.gethostname()
