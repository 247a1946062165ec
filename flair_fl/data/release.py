"""FLAIR's two public releases: Apple's tarballs and the Hugging Face parquet copy.

Apple's release (what ml-flair's download_dataset.py fetches), under a base URL:

    labels/labels_and_metadata.json, labels/label_relationship.txt
    images/small/small_images-00.tar.gz ... -42.tar.gz   256 px JPEGs -> small_images/
    images/raw/images-00.tar.gz ... -42.tar.gz           full-size originals (~1.2 TB)

Apple publishes no checksums or sizes for these files: each is checked against the HTTP
Content-Length, tarballs also by the gzip CRC-32 and length (read to the end while
extracting), the JSON by parsing and the image set by `load_raw_flair` (every listed image
present). `checksums` ({file name: sha256}) adds digest checks for a mirror that has them.

Hugging Face (`apple/flair`): parquet files under data/, listed with their sizes and SHA-256
digests (Git LFS object ids) by the Hub's tree API, so each is verified by digest.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urljoin

from flair_fl.data.download import (
    BLOCK,
    RETRY_STATUS,
    DownloadError,
    RemoteFile,
    RetryPolicy,
    fetch_all,
)
from flair_fl.data.raw import load_raw_flair

log = logging.getLogger(__name__)
APPLE_BASE_URL = "https://docs-assets.developer.apple.com/ml-research/datasets/flair/"
NUM_ARCHIVES = 43
LABEL_PATHS = ("labels/labels_and_metadata.json", "labels/label_relationship.txt")
SMALL_ARCHIVE = "images/small/small_images-{:02d}.tar.gz"
RAW_ARCHIVE = "images/raw/images-{:02d}.tar.gz"
MANIFEST = ".flair_fl_download.json"  # archives already extracted (they may be deleted)
HF_ENDPOINT, HF_REPO = "https://huggingface.co", "apple/flair"
RAW_WARNING = (
    "WARNING: --raw also downloads FLAIR's full-size original images: 43 more archives, about "
    "1.2 TB once extracted (plus each archive while it is extracted). Training uses only the "
    "256 px small images; stop now (Ctrl-C) unless you need the originals."
)


class UnsafeArchiveError(DownloadError):
    """An archive member would escape the dataset directory or is not a plain file/dir."""


@dataclass(frozen=True)
class DownloadSummary:
    """What a finished download holds."""

    dataset_dir: Path
    images: int
    users: int
    archives_extracted: int


def release_files(
    base_url: str = APPLE_BASE_URL,
    raw: bool = False,
    checksums: Mapping[str, str] | None = None,
) -> tuple[list[RemoteFile], list[RemoteFile]]:
    """(label files, image archives) of Apple's release under `base_url`."""
    base = base_url.rstrip("/") + "/"
    sums = checksums or {}
    paths = [SMALL_ARCHIVE.format(i) for i in range(NUM_ARCHIVES)]
    if raw:
        paths += [RAW_ARCHIVE.format(i) for i in range(NUM_ARCHIVES)]

    def remote(path: str) -> RemoteFile:
        name = PurePosixPath(path).name
        return RemoteFile(urljoin(base, path), name, sha256=sums.get(name))

    return [remote(p) for p in LABEL_PATHS], [remote(p) for p in paths]


def download_flair(
    dataset_dir: str | Path,
    base_url: str = APPLE_BASE_URL,
    raw: bool = False,
    workers: int = 4,
    keep_archives: bool = False,
    checksums: Mapping[str, str] | None = None,
    policy: RetryPolicy | None = None,
    progress: bool = True,
) -> DownloadSummary:
    """Download and extract Apple's FLAIR release into `dataset_dir` (resumable).

    Archives already extracted by an earlier run (recorded in `.flair_fl_download.json`)
    are skipped; everything else resumes where it stopped.
    """
    root = Path(dataset_dir)
    root.mkdir(parents=True, exist_ok=True)
    if raw:
        log.warning(RAW_WARNING)
    labels, archives = release_files(base_url, raw, checksums)
    done = _read_manifest(root)
    pending = [a for a in archives if a.name not in done]
    fetch_all([*labels, *pending], root, workers, policy, progress)
    for archive in pending:
        done[archive.name] = safe_extract(root / archive.name, root)
        _write_manifest(root, done)
        if not keep_archives:
            (root / archive.name).unlink()
    flair = load_raw_flair(root)  # every listed image must now be present
    return DownloadSummary(root, len(flair.records), len(flair.users()), len(pending))


def safe_extract(archive: Path, dest: Path) -> int:
    """Extract a .tar(.gz) into `dest`; returns the number of files.

    Members must be regular files or directories with relative names (absolute paths, links
    and devices are rejected) and pass Python's `data` tar filter (nothing outside `dest`). They
    are extracted into a staging directory inside `dest` and moved into place only when the
    whole archive passed, so a rejected or damaged archive leaves nothing behind.
    """
    staging = dest / f".extracting-{archive.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        opener = gzip.open if archive.name.endswith(".gz") else open
        with opener(archive, "rb") as stream:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.extractall(staging, filter=_plain_members_only)
            while stream.read(BLOCK):  # to the gzip trailer: checks its CRC-32 and length
                pass
        return _merge(staging, dest)
    except (tarfile.FilterError, UnsafeArchiveError) as err:
        raise UnsafeArchiveError(
            f"{archive}: unsafe archive, rejected ({err}); nothing from it was extracted"
        ) from err
    except (
        tarfile.ReadError,
        tarfile.CompressionError,
        gzip.BadGzipFile,
        EOFError,
        zlib.error,
    ) as err:
        archive.unlink(missing_ok=True)
        raise DownloadError(
            f"{archive}: damaged archive ({err}); deleted it, run again to download it again"
        ) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _plain_members_only(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    if member.name.startswith(("/", "\\")) or os.path.isabs(member.name):
        # The data filter would strip the slash and extract inside `dest`; FLAIR's archives
        # never hold absolute names, so one is a sign of a wrong or tampered archive.
        raise UnsafeArchiveError(f"member {member.name!r} has an absolute path")
    if not (member.isfile() or member.isdir()):
        kind = (
            "symbolic link"
            if member.issym()
            else "hard link"
            if member.islnk()
            else "device"
            if member.isdev()
            else "special file"
        )
        raise UnsafeArchiveError(
            f"member {member.name!r} is a {kind}; FLAIR archives hold only files and directories"
        )
    return tarfile.data_filter(member, dest)


def _merge(staging: Path, dest: Path) -> int:
    """Move staged files into `dest` (directories merged; parents sort before children)."""
    files = 0
    for path in sorted(staging.rglob("*")):
        target = dest / path.relative_to(staging)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            os.replace(path, target)
            files += 1
    return files


def _read_manifest(root: Path) -> dict[str, int]:
    path = root / MANIFEST
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _write_manifest(root: Path, done: dict[str, int]) -> None:
    partial = root / (MANIFEST + ".partial")
    partial.write_text(json.dumps(done, indent=1, sort_keys=True))
    os.replace(partial, root / MANIFEST)


# --- Hugging Face ------------------------------------------------------------------------


def hub_parquet_files(
    endpoint: str = HF_ENDPOINT,
    repo: str = HF_REPO,
    revision: str = "main",
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy | None = None,
) -> list[RemoteFile]:
    """The parquet files of a Hub dataset repo, with the sizes and SHA-256 digests it lists."""
    base = endpoint.rstrip("/")
    url: str | None = f"{base}/api/datasets/{repo}/tree/{quote(revision, safe='')}?recursive=true"
    files: list[RemoteFile] = []
    while url:
        entries, url = _get_json_page(url, dict(headers or {}), policy or RetryPolicy())
        for entry in entries:
            path = str(entry.get("path", ""))
            if entry.get("type") == "file" and path.endswith(".parquet"):
                lfs = entry.get("lfs") or {}
                files.append(
                    RemoteFile(
                        f"{base}/datasets/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}",
                        path,
                        size=int(entry["size"]),
                        sha256=lfs.get("oid"),
                    )
                )
    if not files:
        raise DownloadError(f"{base}/datasets/{repo} (revision {revision}) lists no parquet files")
    return sorted(files, key=lambda f: f.name)


def download_hub_parquet(
    dataset_dir: str | Path,
    endpoint: str = HF_ENDPOINT,
    repo: str = HF_REPO,
    revision: str = "main",
    token: str | None = None,
    workers: int = 4,
    policy: RetryPolicy | None = None,
    progress: bool = True,
) -> list[Path]:
    """Download the parquet files of `apple/flair` (verified by SHA-256) into `dataset_dir`."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    files = hub_parquet_files(endpoint, repo, revision, headers, policy)
    return fetch_all(files, Path(dataset_dir), workers, policy, progress, headers)


def _get_json_page(
    url: str, headers: dict[str, str], policy: RetryPolicy
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of a Hub listing and the URL of the next (HTTP Link header), retried."""
    for attempt in range(1, policy.attempts + 1):
        request = urllib.request.Request(url)
        for key, value in headers.items():
            request.add_unredirected_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
                body, link = json.loads(response.read()), response.headers.get("Link", "")
            if not isinstance(body, list):
                raise DownloadError(f"{url}: expected a JSON list of files, got {body!r:.200}")
            return body, _next_link(link)
        except urllib.error.HTTPError as err:
            if err.code not in RETRY_STATUS or attempt == policy.attempts:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as err:
            if attempt == policy.attempts:
                raise DownloadError(f"{url}: {err}") from err
        time.sleep(policy.backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _next_link(header: str) -> str | None:
    for part in header.split(","):
        if 'rel="next"' in part and "<" in part:
            return part[part.index("<") + 1 : part.index(">")]
    return None
