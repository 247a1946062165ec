"""Extracting a downloaded FLAIR tarball: all of it, safely, or nothing.

An archive comes from a mirror, so its members are outside input. A member must be a regular
file or directory under the archive's image directory (`small_images/` or `raw_images/`):
absolute names, `..`, links, devices, sparse files and anything that would land elsewhere
(over `labels_and_metadata.json` or the download manifest, say) are refused, and so is a
file that would replace a different one extracted from an earlier archive. Decompression is
capped (per member, per archive, and in bytes out per byte in), so a tar or gzip bomb stops
with a clear error instead of filling the disk.

Members go to a staging directory inside the dataset directory and are moved into place only
when the whole archive passed; a merge that fails half-way is undone, so a rejected, damaged
or failed archive leaves nothing behind. A rejected archive is moved aside
(`<name>.rejected`), so a later run fetches it again from a fixed mirror.
"""

from __future__ import annotations

import errno
import filecmp
import gzip
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from flair_fl.data.download import BLOCK
from flair_fl.errors import DownloadError, UnsafeArchiveError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass(frozen=True)
class ExtractLimits:
    """Decompression caps. FLAIR's small tarballs hold ~140 MB of JPEGs each (~1 byte out
    per byte in); a raw tarball ~28 GB of originals of at most tens of MB each."""

    member_bytes: int = 1 << 30  # one member
    total_bytes: int = 64 << 30  # everything decompressed from one archive
    ratio: float = 20.0  # bytes decompressed per archive byte ...
    ratio_floor: int = 64 << 20  # ... checked once this many bytes came out


class _CappedReader:
    """A decompressed stream that raises once it yields more than the caps allow."""

    def __init__(self, stream: Any, archive: Path, limits: ExtractLimits):
        self.stream, self.archive, self.limits = stream, archive, limits
        self.compressed = archive.stat().st_size
        self.out = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size)
        self.out += len(data)
        limits = self.limits
        if self.out > limits.total_bytes:
            raise UnsafeArchiveError(
                f"decompresses to more than {limits.total_bytes} bytes (the cap per archive)"
            )
        if self.out > limits.ratio_floor and self.out > limits.ratio * self.compressed:
            raise UnsafeArchiveError(
                f"decompresses to over {limits.ratio:g}x its {self.compressed} bytes (a "
                "decompression bomb; FLAIR's JPEG tarballs barely compress)"
            )
        return data


def safe_extract(
    archive: Path, dest: Path, image_dir: str, limits: ExtractLimits | None = None
) -> int:
    """Extract a .tar(.gz) of images under `image_dir/` into `dest`; returns the file count."""
    limits = limits or ExtractLimits()
    staging = dest / f".extracting-{archive.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        opener = gzip.open if archive.name.endswith(".gz") else open
        with opener(archive, "rb") as raw:
            stream = _CappedReader(raw, archive, limits)
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                tar.extractall(staging, filter=_MemberFilter(image_dir, limits))
            while stream.read(BLOCK):  # to the gzip trailer: checks its CRC-32 and length
                pass
        return _merge(staging, dest)
    except (tarfile.FilterError, UnsafeArchiveError) as err:
        aside = _move_aside(archive)
        raise UnsafeArchiveError(
            f"{archive}: unsafe archive, rejected ({err}); nothing from it was extracted; {aside}"
        ) from None
    except (tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error) as err:
        archive.unlink(missing_ok=True)
        raise DownloadError(
            f"{archive}: damaged archive ({err}); deleted it, run again to download it again"
        ) from None
    except OSError as err:  # gzip.BadGzipFile is one; a full disk another
        if isinstance(err, gzip.BadGzipFile):
            archive.unlink(missing_ok=True)
            raise DownloadError(
                f"{archive}: damaged archive ({err}); deleted it, run again to download it again"
            ) from None
        reason = "the disk is full" if err.errno in _NO_SPACE else (err.strerror or str(err))
        raise DownloadError(
            f"{archive}: could not be extracted into {dest} ({reason}: {err.filename or ''}); "
            "nothing from it was kept, free some space and run again"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_aside(archive: Path) -> str:
    aside = archive.with_name(archive.name + ".rejected")
    try:
        os.replace(archive, aside)
    except OSError:
        archive.unlink(missing_ok=True)
        return "deleted it, a later run downloads it again"
    return f"moved it to {aside} (inspect or delete it), a later run downloads it again"


class _MemberFilter:
    """tarfile's extraction filter: plain members under `image_dir/`, within the caps."""

    def __init__(self, image_dir: str, limits: ExtractLimits):
        self.image_dir, self.limits, self.total = image_dir, limits, 0

    def __call__(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        name = member.name
        if name.startswith(("/", "\\")) or os.path.isabs(name):
            # The data filter would strip the slash and extract inside `dest`; FLAIR's archives
            # never hold absolute names, so one is a sign of a wrong or tampered archive.
            raise UnsafeArchiveError(f"member {name!r} has an absolute path")
        if not (member.isfile() or member.isdir()) or member.issparse():
            raise UnsafeArchiveError(
                f"member {name!r} is a {_kind(member)}; FLAIR archives hold only files and "
                "directories"
            )
        parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p != "."]
        if ".." in parts or not parts or parts[0] != self.image_dir:
            raise UnsafeArchiveError(
                f"member {name!r} is outside {self.image_dir}/ (it could replace the release's "
                "own files); FLAIR archives hold only images there"
            )
        if member.size > self.limits.member_bytes:
            raise UnsafeArchiveError(
                f"member {name!r} is {member.size} bytes, over the cap of "
                f"{self.limits.member_bytes} per member"
            )
        self.total += member.size
        if self.total > self.limits.total_bytes:
            raise UnsafeArchiveError(
                f"members up to {name!r} hold {self.total} bytes, over the cap of "
                f"{self.limits.total_bytes} per archive"
            )
        return tarfile.data_filter(member, dest)


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isdev():
        return "device"
    return "sparse file" if member.issparse() else "special file"


def _same_file(a: Path, b: Path) -> bool:
    return b.is_file() and filecmp.cmp(a, b, shallow=False)


def _merge(staging: Path, dest: Path) -> int:
    """Move staged files into `dest`, all or none (parents sort before children).

    A staged file may only replace an identical one (the same archive extracted again after
    a crash); if any move fails, the files already moved go back and the directories made
    are removed.
    """
    plan = [(p, dest / p.relative_to(staging)) for p in sorted(staging.rglob("*"))]
    for path, target in plan:
        if path.is_file() and target.exists() and not _same_file(path, target):
            raise UnsafeArchiveError(
                f"member {str(path.relative_to(staging))!r} would replace a different "
                f"{target} (extracted from another archive)"
            )
    made: list[Path] = []
    moved: list[tuple[Path, Path]] = []
    files = 0
    try:
        for path, target in plan:
            if path.is_dir():
                if not target.is_dir():
                    target.mkdir()
                    made.append(target)
            else:
                files += 1
                if not target.exists():  # an identical file already there stays as it is
                    os.replace(path, target)
                    moved.append((path, target))
    except OSError:
        for path, target in reversed(moved):
            os.replace(target, path)
        for directory in reversed(made):
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return files
