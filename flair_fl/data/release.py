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

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urljoin

from flair_fl.data.archive import ExtractLimits, safe_extract
from flair_fl.data.download import RETRY_STATUS, RemoteFile, RetryPolicy, fetch_all
from flair_fl.data.raw import IMAGE_DIR, load_raw_flair
from flair_fl.errors import DownloadError

log = logging.getLogger(__name__)
APPLE_BASE_URL = "https://docs-assets.developer.apple.com/ml-research/datasets/flair/"
NUM_ARCHIVES = 43
LABEL_PATHS = ("labels/labels_and_metadata.json", "labels/label_relationship.txt")
SMALL_ARCHIVE = "images/small/small_images-{:02d}.tar.gz"
RAW_IMAGE_DIR = "raw_images"  # where the raw archives' originals go
RAW_ARCHIVE = "images/raw/images-{:02d}.tar.gz"
MANIFEST = ".flair_fl_download.json"  # archives already extracted (they may be deleted)
HF_ENDPOINT, HF_REPO = "https://huggingface.co", "apple/flair"
HF_SHARD = re.compile(r"data/(train|val|test)-\d{5}-of-\d{5}\.parquet")  # apple/flair's files
RAW_WARNING = (
    "WARNING: --raw also downloads FLAIR's full-size original images: 43 more archives, about "
    "1.2 TB once extracted (plus each archive while it is extracted). Training uses only the "
    "256 px small images; stop now (Ctrl-C) unless you need the originals."
)


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
    limits: ExtractLimits | None = None,
) -> DownloadSummary:
    """Download and extract Apple's FLAIR release into `dataset_dir` (resumable).

    Archives already extracted by an earlier run (recorded in `.flair_fl_download.json`)
    are skipped; everything else resumes where it stopped. Extraction: flair_fl.data.archive.
    """
    root = dataset_root(dataset_dir)
    if raw:
        log.warning(RAW_WARNING)
    labels, archives = release_files(base_url, raw, checksums)
    done = _read_manifest(root)
    pending = [a for a in archives if a.name not in done]
    fetch_all([*labels, *pending], root, workers, policy, progress)
    for archive in pending:
        image_dir = IMAGE_DIR if archive.name.startswith("small_images") else RAW_IMAGE_DIR
        done[archive.name] = safe_extract(root / archive.name, root, image_dir, limits)
        _write_manifest(root, done)
        if not keep_archives:
            (root / archive.name).unlink()
    flair = load_raw_flair(root)  # every listed image must now be present
    return DownloadSummary(root, len(flair.records), len(flair.users()), len(pending))


def dataset_root(dataset_dir: str | Path) -> Path:
    """The dataset directory, made if missing; a file there is refused in one line."""
    root = Path(dataset_dir)
    if root.exists() and not root.is_dir():
        raise DownloadError(f"--dataset-dir {root}: exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"--dataset-dir {root}: cannot be created ({err.strerror})") from None
    return root


def _read_manifest(root: Path) -> dict[str, int]:
    """Archives extracted so far; a damaged manifest counts as none (re-extracting an
    archive over its own identical files is safe)."""
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        done = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        done = None
    if not isinstance(done, dict) or not all(isinstance(v, int) for v in done.values()):
        log.warning("%s: damaged, every archive is extracted again", path)
        return {}
    return {str(k): v for k, v in done.items()}


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
            path = str(entry.get("path", "")) if isinstance(entry, dict) else ""
            if (
                isinstance(entry, dict)
                and entry.get("type") == "file"
                and path.endswith(".parquet")
            ):
                files.append(_hub_file(entry, f"{base}/datasets/{repo}", revision))
    if not files:
        raise DownloadError(f"{base}/datasets/{repo} (revision {revision}) lists no parquet files")
    return sorted(files, key=lambda f: f.name)


def _hub_file(entry: dict[str, Any], repo_url: str, revision: str) -> RemoteFile:
    """A listed parquet file; the listing is outside input, so its `path` (the local name)
    must be one of apple/flair's shard names and its size a number."""
    path = str(entry["path"])
    if not HF_SHARD.fullmatch(path):
        raise DownloadError(
            f"{repo_url}: listing entry {path!r} refused: not one of apple/flair's shard names "
            "(data/<train|val|test>-NNNNN-of-NNNNN.parquet)"
        )
    size, lfs = entry.get("size"), entry.get("lfs") or {}
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise DownloadError(f"{repo_url}: listing entry {path!r} has no valid size ({size!r})")
    digest = lfs.get("oid") if isinstance(lfs, dict) else None
    if digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", str(digest)):
        raise DownloadError(f"{repo_url}: listing entry {path!r} has no valid SHA-256 ({digest!r})")
    url = f"{repo_url}/resolve/{quote(revision, safe='')}/{quote(path)}"
    return RemoteFile(url, path, size=size, sha256=digest)


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
    root = dataset_root(dataset_dir)
    files = hub_parquet_files(endpoint, repo, revision, headers, policy)
    return fetch_all(files, root, workers, policy, progress, headers)


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
