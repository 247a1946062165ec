"""Output files that survive a full disk or a kill: whole-or-nothing writes, undoable appends.

- `write_atomically`: the new content goes to a temporary file in the same directory, is
  fsynced and renamed over the old file, so the old content stays until the new one is whole.
- `append_durably`: one append, fsynced; if it fails half-way, the file is truncated back to
  its previous size, so earlier lines stay intact and parseable.

Both raise `OutputWriteError`, which names the file and says when the disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from flair_fl.errors import OutputWriteError

# Out of space, over a quota, or over the file size limit (RLIMIT_FSIZE): "the disk is full".
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def write_error(path: Path, err: OSError) -> OutputWriteError:
    """An `OutputWriteError` for a failed write of `path`, saying why in words."""
    reason = err.strerror or str(err)
    if err.errno in NO_SPACE:
        reason = f"the disk is full ({reason}); free some space and run again"
    return OutputWriteError(
        err.errno, f"{path}: could not be written: {reason}. Its previous content is kept."
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of `path` left by writers that were killed mid-write."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_atomically(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str: UTF-8): temporary file, fsync, rename. Temporaries a
    killed writer left behind (a checkpoint's can be large) are removed first."""
    payload = data.encode() if isinstance(data, str) else data
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(path, err) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def append_durably(path: Path, data: bytes | str) -> None:
    """Append `data` (str: UTF-8) to `path` and fsync; on failure, undo the partial append."""
    payload = memoryview(data.encode() if isinstance(data, str) else data)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while payload:  # os.write may write part of it (the last bytes before the limit)
                payload = payload[os.write(fd, payload) :]
            os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):  # shrinking a file needs no space
                os.ftruncate(fd, size)
            raise write_error(path, err) from err
    finally:
        os.close(fd)
