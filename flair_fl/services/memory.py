"""Peak resident memory of this process, measured per address space.

`ru_maxrss` is not enough: a child started by fork+exec (Ray workers, `subprocess`,
multiprocessing's spawn) inherits its parent's high-water mark, so a small process forked from
a large one reports the large one's peak. The kernel's VmHWM (/proc/self/status) starts afresh
at exec and can be reset (`reset_peak_rss`), e.g. between two runs in one process.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident set size of this process's address space, MiB."""
    with contextlib.suppress(OSError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> None:
    """Start the peak over from the current RSS (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
