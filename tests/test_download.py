"""Downloading Apple's FLAIR release from a loopback server that serves it in the real layout."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flair_fl.data import download as download_module
from flair_fl.data.download import RetryPolicy
from flair_fl.data.prepare import prepare_flair
from flair_fl.data.raw import IMAGE_DIR, METADATA_FILE, RELATIONSHIP_FILE
from flair_fl.data.release import (
    MANIFEST,
    NUM_ARCHIVES,
    RAW_WARNING,
    download_flair,
)
from flair_fl.errors import DownloadError, UnsafeArchiveError
from tests.h5_contents import hdf5_contents
from tests.loopback import LoopbackServer

REPO = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(attempts=3, backoff_s=0.01, timeout_s=10)
LABELS_PATH = "/flair/labels/labels_and_metadata.json"


def archive_path(index: int, kind: str = "small") -> str:
    name = "small_images" if kind == "small" else "images"
    return f"/flair/images/{kind}/{name}-{index:02d}.tar.gz"


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


@dataclass(frozen=True)
class Release:
    files: dict[str, bytes]  # URL path -> bytes, as Apple serves them
    images: dict[str, bytes]  # small_images/<name> -> bytes
    archive_images: dict[int, list[str]]  # archive index -> image file names in it
    num_records: int


def build_release(raw_dir: Path, image_dir: str = IMAGE_DIR, kind: str = "small") -> Release:
    """The raw directory split into Apple's 43 tarballs (image k in archive k mod 43)."""
    images = {p.name: p.read_bytes() for p in sorted((raw_dir / IMAGE_DIR).glob("*.jpg"))}
    names = list(images)
    groups = {i: names[i::NUM_ARCHIVES] for i in range(NUM_ARCHIVES)}
    files = {
        archive_path(i, kind): tar_gz([file_member(f"{image_dir}/{n}", images[n]) for n in group])
        for i, group in groups.items()
    }
    metadata = (raw_dir / METADATA_FILE).read_bytes()
    files[LABELS_PATH] = metadata
    files["/flair/labels/label_relationship.txt"] = (raw_dir / RELATIONSHIP_FILE).read_bytes()
    return Release(files, images, groups, len(json.loads(metadata)))


@pytest.fixture(scope="module")
def release(tiny_raw: Path) -> Release:
    return build_release(tiny_raw)


@pytest.fixture
def server(release: Release, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackServer]:
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy setting must not catch loopback
    with LoopbackServer() as server:
        server.served.files.update(release.files)
        yield server


def base_url(server: LoopbackServer) -> str:
    return server.url + "/flair/"


def everything_under(root: Path, dest: Path) -> bool:
    """Whether every path below `root` is `dest` or inside it."""
    return all(p == dest or dest in p.parents for p in root.rglob("*"))


# --- a complete run --------------------------------------------------------------------


def test_complete_run_extracts_every_image_and_a_rerun_fetches_nothing(
    server: LoopbackServer, release: Release, tiny_hdf5: Path, tmp_path: Path
) -> None:
    # Prepare
    dest = tmp_path / "flair"

    # Execute
    summary = download_flair(dest, base_url(server), workers=4, policy=FAST, progress=False)
    first_requests = list(server.served.requests)
    server.served.requests.clear()
    again = download_flair(dest, base_url(server), workers=4, policy=FAST, progress=False)

    # Assert: the real layout, byte for byte, archives removed, no Range needed
    images = {p.name: p.read_bytes() for p in (dest / IMAGE_DIR).iterdir()}
    assert images == release.images
    assert (dest / METADATA_FILE).read_bytes() == release.files[LABELS_PATH]
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [METADATA_FILE, RELATIONSHIP_FILE, IMAGE_DIR, MANIFEST]
    )
    assert summary.images == release.num_records and summary.archives_extracted == NUM_ARCHIVES
    assert sorted(p for p, _ in first_requests) == sorted(release.files)  # no raw archives
    assert all(rng is None for _, rng in first_requests)
    assert again.archives_extracted == 0 and server.served.requests == []
    # the tarball route prepares the same HDF5 as the source directory (and the parquet route,
    # tests/test_parquet.py)
    prepared = prepare_flair(dest, tmp_path / "flair.hdf5", progress=False)
    assert hdf5_contents(prepared) == hdf5_contents(tiny_hdf5)


def test_keep_archives_keeps_the_verified_tarballs(
    server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Execute
    download_flair(tmp_path, base_url(server), keep_archives=True, policy=FAST, progress=False)

    # Assert
    kept = {p.name: p.read_bytes() for p in tmp_path.glob("*.tar.gz")}
    served = {Path(archive_path(i)).name: release.files[archive_path(i)] for i in range(43)}
    assert kept == served


def test_raw_images_only_with_raw_and_a_warning(
    server: LoopbackServer, tiny_raw: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the originals live in images/raw/images-NN.tar.gz -> raw_images/
    raw_release = build_release(tiny_raw, image_dir="raw_images", kind="raw")
    server.served.files.update({k: v for k, v in raw_release.files.items() if "/raw/" in k})

    # Execute
    with caplog.at_level(logging.WARNING):
        download_flair(tmp_path, base_url(server), raw=True, policy=FAST, progress=False)

    # Assert
    assert RAW_WARNING in caplog.text and "1.2 TB" in RAW_WARNING
    assert {p.name for p in (tmp_path / "raw_images").iterdir()} == set(raw_release.images)


# --- resuming and retrying -------------------------------------------------------------


def test_dropped_connection_resumes_with_a_range_request(
    server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Prepare: the server closes the connection halfway through archive 05, once
    path = archive_path(5)
    half = len(release.files[path]) // 2
    server.served.drop(path, after=half)

    # Execute
    download_flair(tmp_path, base_url(server), keep_archives=True, policy=FAST, progress=False)

    # Assert
    assert server.served.requests_for(path) == [None, f"bytes={half}-"]
    assert (tmp_path / "small_images-05.tar.gz").read_bytes() == release.files[path]


def test_part_left_by_a_killed_run_is_resumed(
    server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Prepare: an earlier run died after 100 bytes of archive 09
    path = archive_path(9)
    (tmp_path / "small_images-09.tar.gz.part").write_bytes(release.files[path][:100])

    # Execute
    download_flair(tmp_path, base_url(server), keep_archives=True, policy=FAST, progress=False)

    # Assert
    assert server.served.requests_for(path) == ["bytes=100-"]
    assert (tmp_path / "small_images-09.tar.gz").read_bytes() == release.files[path]
    assert not list(tmp_path.glob("*.part"))


def test_server_errors_are_retried_with_exponential_backoff(
    server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    server.served.fail(LABELS_PATH, 500, 503)
    sleeps: list[float] = []
    monkeypatch.setattr(download_module.time, "sleep", sleeps.append)
    policy = RetryPolicy(attempts=3, backoff_s=0.5, timeout_s=10)

    # Execute
    download_flair(tmp_path, base_url(server), policy=policy, progress=False)

    # Assert
    assert len(server.served.requests_for(LABELS_PATH)) == 3
    assert sleeps == [0.5, 1.0]
    assert (tmp_path / METADATA_FILE).is_file()


def test_gives_up_after_the_last_attempt_and_keeps_the_part(
    server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Prepare: every attempt at archive 03 breaks after 100 bytes
    path = archive_path(3)
    for _ in range(FAST.attempts):
        server.served.drop(path, after=100)

    # Execute
    with pytest.raises(DownloadError, match="failed after 3 attempts") as err:
        download_flair(tmp_path, base_url(server), policy=FAST, progress=False)

    # Assert: each attempt resumed where the last stopped; the next run resumes at 300
    assert "resume from 300 bytes" in str(err.value)
    assert server.served.requests_for(path) == [None, "bytes=100-", "bytes=200-"]
    assert (tmp_path / "small_images-03.tar.gz.part").read_bytes() == release.files[path][:300]
    assert not (tmp_path / "small_images-03.tar.gz").exists()  # never a final-named part


def test_missing_file_fails_without_retrying(server: LoopbackServer, tmp_path: Path) -> None:
    # Prepare
    del server.served.files[archive_path(42)]

    # Execute
    with pytest.raises(DownloadError, match=r"small_images-42\.tar\.gz: HTTP 404"):
        download_flair(tmp_path, base_url(server), policy=FAST, progress=False)

    # Assert
    assert len(server.served.requests_for(archive_path(42))) == 1


# --- integrity -------------------------------------------------------------------------


@pytest.mark.parametrize("correct", [True, False])
def test_checksums_are_verified_when_given(
    correct: bool, server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Prepare
    digest = hashlib.sha256(release.files[archive_path(4)]).hexdigest()
    checksums = {"small_images-04.tar.gz": digest if correct else "0" * 64}

    # Execute
    def run() -> object:
        return download_flair(
            tmp_path, base_url(server), checksums=checksums, policy=FAST, progress=False
        )

    if correct:
        run()
    else:
        with pytest.raises(DownloadError, match="SHA-256"):
            run()

    # Assert: a file that fails its check is deleted, never kept under its final name
    assert not (tmp_path / "small_images-04.tar.gz.part").exists()
    assert (tmp_path / IMAGE_DIR).is_dir() == correct


def test_corrupt_archive_is_deleted_and_downloaded_again(
    server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Prepare: flip a bit of archive 11's gzip CRC-32 (its tar content stays readable)
    path = archive_path(11)
    good = release.files[path]
    server.served.files[path] = good[:-8] + bytes([good[-8] ^ 1]) + good[-7:]

    # Execute
    with pytest.raises(DownloadError, match="damaged archive") as err:
        download_flair(tmp_path, base_url(server), policy=FAST, progress=False)
    extracted = {p.name for p in (tmp_path / IMAGE_DIR).iterdir()}
    server.served.files[path] = good
    server.served.requests.clear()
    download_flair(tmp_path, base_url(server), policy=FAST, progress=False)

    # Assert: nothing of it was kept; the rerun fetched it alone, extracted the rest
    assert "CRC" in str(err.value)
    assert not extracted & set(release.archive_images[11])
    assert [p for p, _ in server.served.requests] == [path]
    assert {p.name for p in (tmp_path / IMAGE_DIR).iterdir()} == set(release.images)


def unsafe_members(tmp_path: Path) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    def special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        return info, None

    return {
        "traversal": file_member("../../../escaped.txt", b"owned"),
        "absolute": file_member(str(tmp_path / "escaped.txt"), b"owned"),
        "symlink-outside": special("small_images/a.jpg", tarfile.SYMTYPE, "../../escaped.txt"),
        "symlink-inside": special("small_images/b.jpg", tarfile.SYMTYPE, "a.jpg"),
        "hardlink": special("small_images/c.jpg", tarfile.LNKTYPE, "small_images/x.jpg"),
        "device": special("small_images/d.jpg", tarfile.CHRTYPE),
    }


@pytest.mark.parametrize(
    "kind", ["traversal", "absolute", "symlink-outside", "symlink-inside", "hardlink", "device"]
)
def test_unsafe_archive_is_rejected_and_writes_nothing(
    kind: str, server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Prepare: archive 07 = two real images, then the unsafe member
    dest = tmp_path / "flair"
    names = release.archive_images[7]
    bad = unsafe_members(tmp_path)[kind]
    server.served.files[archive_path(7)] = tar_gz(
        [file_member(f"small_images/{n}", release.images[n]) for n in names[:2]] + [bad]
    )

    # Execute
    with pytest.raises(UnsafeArchiveError) as err:
        download_flair(dest, base_url(server), policy=FAST, progress=False)

    # Assert: named, nothing outside the dataset dir, nothing of that archive inside it
    assert "small_images-07.tar.gz" in str(err.value) and bad[0].name in str(err.value)
    assert everything_under(tmp_path, dest)
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))
    assert not list(dest.glob(".extracting-*"))
    assert not {p.name for p in (dest / IMAGE_DIR).iterdir()} & set(names)


# --- the CLI ---------------------------------------------------------------------------


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/download_flair.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_downloads_and_reports_errors_without_traceback(
    server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Prepare
    common = ["--base-url", base_url(server), "--no-progress", "--backoff", "0.01"]

    # Execute
    done = run_cli("--dataset-dir", tmp_path / "ok", *common)
    server.served.files[archive_path(0)] = tar_gz([file_member("../x.jpg", b"x")])
    rejected = run_cli("--dataset-dir", tmp_path / "bad", *common)

    # Assert
    assert done.returncode == 0, done.stderr
    assert f"{release.num_records} images of 60 users" in done.stdout
    assert "prepare_flair.py --dataset-dir" in done.stdout
    assert rejected.returncode == 2
    assert "unsafe archive" in rejected.stderr and "Traceback" not in rejected.stderr
