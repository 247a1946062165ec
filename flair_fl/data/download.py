"""Resumable, verified, parallel HTTP downloads (standard library only).

Each file is written to `<name>.part` and renamed when complete and verified, so a file
under its final name is always whole. A `.part` left by an interrupted run (or a dropped
connection) is resumed with an HTTP Range request; a server that ignores Range sends the whole
file and the part is restarted. Transient failures (connection errors, timeouts, HTTP 408,
429 and 5xx, short transfers) are retried with exponential backoff; other HTTP errors fail at
once. Verification: the byte count against Content-Length (or Content-Range) and, where the
publisher gives one, the SHA-256 digest.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from flair_fl.errors import DiskFullError, DownloadError

log = logging.getLogger(__name__)
BLOCK = 1 << 20
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class _Transient(Exception):
    """A failure worth retrying (the .part file, if any, is kept for resuming)."""


@dataclass(frozen=True)
class RemoteFile:
    """A file to fetch: where from, the name to store it under, what to expect."""

    url: str
    name: str  # relative path under the destination directory
    size: int | None = None  # bytes, when the publisher lists them
    sha256: str | None = None  # hex digest, when the publisher lists one


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per file, with sleeps of backoff_s * 2**k between them."""

    attempts: int = 6
    backoff_s: float = 2.0
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"need attempts >= 1, backoff >= 0, timeout > 0; got {self}")


@dataclass
class _Progress:
    """One byte counter shared by every transfer (thread-safe)."""

    bar: tqdm
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_total(self, size: int) -> None:
        with self.lock:
            self.bar.total = (self.bar.total or 0) + size
            self.bar.refresh()

    def advance(self, size: int) -> None:
        with self.lock:
            self.bar.update(size)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def inside(root: Path, name: str) -> Path:
    """`root / name`, refused unless it resolves to a path inside `root` (names come from
    listings and archives: outside input)."""
    target = (root / name).resolve()
    if not name or Path(name).is_absolute() or not target.is_relative_to(root.resolve()):
        raise DownloadError(f"{name!r}: refused, it would be written outside {root}")
    if target == root.resolve():
        raise DownloadError(f"{name!r}: refused, not a file name inside {root}")
    return root / name


def fetch_all(
    files: Sequence[RemoteFile],
    dest_dir: Path,
    workers: int = 4,
    policy: RetryPolicy | None = None,
    progress: bool = True,
    headers: dict[str, str] | None = None,
) -> list[Path]:
    """Download `files` into `dest_dir`, `workers` at a time; files already there are kept.

    Every file is attempted; if any fails, one DownloadError lists them all (finished files
    stay, partial ones resume on the next run). A full disk stops the files not yet started
    and is reported once, naming the first file that did not fit.
    """
    policy = policy or RetryPolicy()
    bar = tqdm(desc="download", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)
    shared = _Progress(bar)
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            futures = [
                pool.submit(fetch, f, dest_dir, policy, shared, headers or {}) for f in files
            ]
            errors = []
            for future in as_completed(futures):
                try:
                    err = future.exception()
                except CancelledError:
                    continue
                if err is not None:
                    errors.append(err)
                if isinstance(err, DiskFullError):
                    for pending in futures:
                        pending.cancel()  # those not started: they would fail the same way
    finally:
        bar.close()
    if errors:
        raise _combined(errors, dest_dir)
    return [dest_dir / f.name for f in files]


def _combined(errors: list[BaseException], dest_dir: Path) -> DownloadError:
    """One error for all: a full disk once (naming the first file), the others one a line."""
    full = [err for err in errors if isinstance(err, DiskFullError)]
    lines = [str(err) for err in errors if not isinstance(err, DiskFullError)]
    if full:
        others = f" (and {len(full) - 1} more file(s))" if len(full) > 1 else ""
        lines.insert(
            0,
            f"the disk is full: {full[0].path} could not be written{others}; free some space "
            f"in {dest_dir} and run again (finished files are kept, partial ones resume)",
        )
    return DownloadError("\n".join(lines))


def fetch(
    remote: RemoteFile,
    dest_dir: Path,
    policy: RetryPolicy,
    progress: _Progress | None = None,
    headers: dict[str, str] | None = None,
) -> Path:
    """Download one file (resuming, retrying, verifying) and return its path."""
    final = inside(dest_dir, remote.name)
    if final.is_file():
        _verify(remote, final, final.stat().st_size, delete_on_mismatch=False)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    transfer = _Transfer(remote, part, policy.timeout_s, progress, headers or {})
    for attempt in range(1, policy.attempts + 1):
        try:
            size = transfer.run()
            break
        except _Transient as err:
            if attempt == policy.attempts:
                raise DownloadError(
                    f"{remote.url}: failed after {attempt} attempts ({err}); run again to "
                    f"resume from {part.stat().st_size if part.exists() else 0} bytes"
                ) from err
            wait = policy.backoff_s * 2 ** (attempt - 1)
            log.warning("%s: %s; retry %d in %.1f s", remote.name, err, attempt, wait)
            time.sleep(wait)
    _verify(remote, part, size, delete_on_mismatch=True)
    os.replace(part, final)
    return final


def _verify(remote: RemoteFile, path: Path, size: int, delete_on_mismatch: bool) -> None:
    problem = None
    if remote.size is not None and size != remote.size:
        problem = f"{size} bytes, the publisher lists {remote.size}"
    elif remote.sha256 and (digest := sha256_of(path)) != remote.sha256.lower():
        problem = f"SHA-256 {digest}, the publisher lists {remote.sha256}"
    if problem:
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        raise DownloadError(
            f"{path}: {problem} ({remote.url}); "
            + ("deleted, run again" if delete_on_mismatch else "delete it and run again")
        )


class _Transfer:
    """One file's transfer state across attempts."""

    def __init__(
        self,
        remote: RemoteFile,
        part: Path,
        timeout: float,
        progress: _Progress | None,
        headers: dict[str, str],
    ):
        self.remote, self.part, self.timeout = remote, part, timeout
        self.progress, self.headers = progress, headers
        self.counted = 0  # bytes reported to the progress bar
        self.total_known = False

    def run(self) -> int:
        """One attempt: returns the complete size, or raises _Transient / DownloadError."""
        offset = self.part.stat().st_size if self.part.exists() else 0
        request = urllib.request.Request(self.remote.url)
        for key, value in self.headers.items():  # e.g. a token: not forwarded on redirects
            request.add_unredirected_header(key, value)
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            return self._http_error(err, offset)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            raise _Transient(f"{type(err).__name__}: {err}") from err
        with response:
            if response.status == 206:
                start, total = _content_range(response.headers.get("Content-Range", ""))
                if start != offset:
                    self.part.unlink()
                    raise _Transient(f"server resumed at byte {start}, not {offset}; restarting")
            else:  # 200: the whole file (Range unsupported or not sent)
                offset, total = 0, _int_or_none(response.headers.get("Content-Length"))
            if total is not None and self.remote.size is not None and total != self.remote.size:
                raise DownloadError(
                    f"{self.remote.url}: the server sends {total} bytes, the publisher lists "
                    f"{self.remote.size}"
                )
            self._announce(total)
            self._stream(response, offset)
        size = self.part.stat().st_size
        if total is not None and size != total:
            if size > total:
                self.part.unlink()
                raise DownloadError(f"{self.remote.url}: got {size} bytes, expected {total}")
            raise _Transient(f"connection closed after {size} of {total} bytes")
        return size

    def _stream(self, response: http.client.HTTPResponse, offset: int) -> None:
        try:  # write errors (a full disk) name the file; read errors are retried
            with self.part.open("ab" if offset else "wb", buffering=0) as out:
                written = offset
                while True:
                    try:
                        chunk = response.read(BLOCK)
                    except (http.client.HTTPException, OSError) as err:
                        raise _Transient(
                            f"transfer interrupted after {written} bytes ({err})"
                        ) from err
                    if not chunk:
                        return
                    view = memoryview(chunk)
                    while view:  # unbuffered: a short write leaves the rest to write
                        view = view[out.write(view) :]
                    written += len(chunk)
                    self._count(written)
        except OSError as err:
            raise _write_failed(self.part, err) from None

    def _http_error(self, err: urllib.error.HTTPError, offset: int) -> int:
        if err.code == 416 and offset:  # range past the end: the part may be complete
            _, total = _content_range(err.headers.get("Content-Range", ""))
            if total == offset:
                self._announce(total)
                self._count(offset)
                return offset
            self.part.unlink()
            raise _Transient("stored part does not match the remote file; restarting")
        if err.code in RETRY_STATUS:
            raise _Transient(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"{self.remote.url}: HTTP {err.code} {err.reason}") from err

    def _announce(self, total: int | None) -> None:
        if self.progress and total is not None and not self.total_known:
            self.total_known = True
            self.progress.add_total(total)

    def _count(self, on_disk: int) -> None:
        if self.progress and on_disk > self.counted:
            self.progress.advance(on_disk - self.counted)
            self.counted = on_disk


def _write_failed(path: Path, err: OSError) -> DownloadError:
    if err.errno in _NO_SPACE:
        return DiskFullError(path, err)
    return DownloadError(f"{path}: could not be written ({err.strerror or err})")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); `bytes */1000` -> (None, 1000)."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", value.strip())
    if not match:
        return None, None
    start, total = match.groups()
    return _int_or_none(start), _int_or_none(total)


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None
