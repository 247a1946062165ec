"""Hostile listings and archives from a loopback mirror: nothing is written outside the
dataset dir, unsafe archives are refused and moved aside, bombs are capped, a failed merge
leaves nothing, a full disk is named once (issue 15, items 2 and 8)."""

# ruff: noqa: F811  (the `release` and `server` fixtures of test_download.py are reused)

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flair_fl.data.archive import ExtractLimits
from flair_fl.data.download import RemoteFile, fetch_all
from flair_fl.data.raw import IMAGE_DIR, METADATA_FILE
from flair_fl.data.release import download_flair, download_hub_parquet
from flair_fl.errors import DownloadError, UnsafeArchiveError
from tests.loopback import LoopbackServer
from tests.test_download import (  # noqa: F401  (fixtures)
    FAST,
    Release,
    archive_path,
    base_url,
    everything_under,
    file_member,
    release,
    server,
    tar_gz,
)

REPO = Path(__file__).resolve().parents[1]
LISTING = "/api/datasets/apple/flair/tree/main?recursive=true"


# --- the Hugging Face listing ----------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackServer]:
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with LoopbackServer() as server:
        yield server


def serve_listing(hub: LoopbackServer, path: str, size: object = "auto") -> None:
    data = b"PAR1 hostile PAR1"
    entry: dict[str, object] = {"type": "file", "path": path}
    if size is not None:
        entry["size"] = len(data) if size == "auto" else size
    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest()}
    hub.served.files[LISTING] = json.dumps([entry]).encode()
    hub.served.files[f"/datasets/apple/flair/resolve/main/{path}"] = data


@pytest.mark.parametrize(
    "path",
    [
        "../../x.parquet",
        "data/../../x.parquet",
        "/tmp/flair_fl_absolute.parquet",
        "data/sub/train-00000-of-00001.parquet",
        "data/evil.parquet",
        "data/train-00000-of-00001.parquet/../../../x.parquet",
    ],
)
def test_listing_entry_outside_the_shard_names_is_refused(
    path: str, hub: LoopbackServer, tmp_path: Path
) -> None:
    # Prepare
    dest = tmp_path / "hf"
    serve_listing(hub, path)

    # Execute
    with pytest.raises(DownloadError, match="refused") as err:
        download_hub_parquet(dest, hub.url, policy=FAST, progress=False)

    # Assert: named, and nothing written anywhere (not even inside)
    assert repr(path) in str(err.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not Path("/tmp/flair_fl_absolute.parquet").exists()


@pytest.mark.parametrize("size", [None, "12", -1, True])
def test_listing_entry_without_a_valid_size_is_a_clear_error(
    size: object, hub: LoopbackServer, tmp_path: Path
) -> None:
    serve_listing(hub, "data/train-00000-of-00001.parquet", size=size)
    with pytest.raises(DownloadError, match="has no valid size"):
        download_hub_parquet(tmp_path, hub.url, policy=FAST, progress=False)


def test_a_name_that_resolves_outside_through_a_symlink_is_refused(
    hub: LoopbackServer, tmp_path: Path
) -> None:
    # Prepare: dest/data is a link to a directory outside dest
    dest, outside = tmp_path / "hf", tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    (dest / "data").symlink_to(outside)
    serve_listing(hub, "data/train-00000-of-00001.parquet")

    # Execute
    with pytest.raises(DownloadError, match="outside"):
        download_hub_parquet(dest, hub.url, policy=FAST, progress=False)

    # Assert
    assert list(outside.iterdir()) == []


# --- hostile archives ------------------------------------------------------------------


def gzip_of(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SMALL_LIMITS = ExtractLimits(
    member_bytes=2 << 20, total_bytes=3 << 20, ratio=20.0, ratio_floor=1 << 20
)
ZEROS = b"\0" * (5 << 20)


def hostile_archives(release: Release) -> dict[str, tuple[bytes, str]]:
    """name -> (archive 07 as served, what the error must say)."""
    first = release.archive_images[7][0]
    good = [(f"small_images/{first}", release.images[first])]
    other = release.archive_images[8][0]  # an image archive 08 holds, with other bytes
    return {
        "ratio-bomb": (
            gzip_of(tar_bytes([*good, ("small_images/zeros.jpg", ZEROS[: 2 << 20])])), "bomb"
        ),
        "member-cap": (
            gzip_of(tar_bytes([("small_images/big.jpg", ZEROS[: 3 << 20])])), "per member"
        ),
        "total-cap": (
            gzip_of(tar_bytes([(f"small_images/r{i}.jpg", os.urandom(1 << 20)) for i in range(4)])),
            "per archive",
        ),
        "trailing-bomb": (gzip_of(tar_bytes(good) + ZEROS), "bomb"),
        "metadata": (gzip_of(tar_bytes([*good, (METADATA_FILE, b"[]")])), METADATA_FILE),
        "metadata-via-dotdot": (
            gzip_of(tar_bytes([*good, (f"small_images/../{METADATA_FILE}", b"[]")])),
            METADATA_FILE,
        ),
        "manifest": (gzip_of(tar_bytes([(".flair_fl_download.json", b"{}")])), "outside"),
        "replaces-another-archive-s-image": (
            gzip_of(tar_bytes([*good, (f"small_images/{other}", b"not the same image")])),
            "would replace a different",
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "kind",
    [
        "ratio-bomb",
        "member-cap",
        "total-cap",
        "trailing-bomb",
        "metadata",
        "metadata-via-dotdot",
        "manifest",
        "replaces-another-archive-s-image",
    ],
)
def test_hostile_archive_is_refused_moved_aside_and_a_fixed_mirror_recovers(
    kind: str, server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Prepare
    dest = tmp_path / "flair"
    served, needle = hostile_archives(release)[kind]
    good = release.files[archive_path(7)]

    def run() -> object:
        return download_flair(
            dest, base_url(server), policy=FAST, progress=False, limits=SMALL_LIMITS
        )

    if kind == "replaces-another-archive-s-image":  # archive 08 was extracted before 07
        run()
        (dest / ".flair_fl_download.json").write_text(json.dumps({"small_images-08.tar.gz": 1}))
    server.served.files[archive_path(7)] = served

    # Execute
    with pytest.raises(UnsafeArchiveError) as err:
        run()
    metadata_after = (dest / METADATA_FILE).read_bytes()
    server.served.files[archive_path(7)] = good  # the mirror is fixed
    summary = run()

    # Assert: refused, named, moved aside (so the next run fetched it again), nothing kept
    message = str(err.value)
    assert "small_images-07.tar.gz" in message and needle in message, message
    assert "moved it to" in message and (dest / "small_images-07.tar.gz.rejected").is_file()
    assert metadata_after == release.files["/flair/labels/labels_and_metadata.json"]
    assert everything_under(tmp_path, dest) and not list(dest.glob(".extracting-*"))
    assert not (dest / IMAGE_DIR / "zeros.jpg").exists()
    images = {p.name: p.read_bytes() for p in (dest / IMAGE_DIR).iterdir()}
    assert images == release.images and summary.images == release.num_records  # type: ignore[attr-defined]


def test_a_merge_that_fails_half_way_leaves_nothing(
    server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Prepare: archive 07's second member needs a directory where a file already is
    dest = tmp_path / "flair"
    (dest / IMAGE_DIR).mkdir(parents=True)
    (dest / IMAGE_DIR / "sub").write_bytes(b"a file, not a directory")
    first = release.archive_images[7][0]
    server.served.files[archive_path(7)] = tar_gz(
        [file_member(f"small_images/{first}", release.images[first]),
         file_member("small_images/sub/x.jpg", release.images[first])]
    )  # fmt: skip

    # Execute
    with pytest.raises(DownloadError, match="nothing from it was kept"):
        download_flair(dest, base_url(server), policy=FAST, progress=False)

    # Assert: the first member, moved before the failure, was taken back
    assert not (dest / IMAGE_DIR / first).exists()
    assert not list(dest.glob(".extracting-*"))


# --- the CLI: a full disk, bad arguments ----------------------------------------------


def run_cli(*args: str | Path, file_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:  # in the child: a file may grow at most `file_limit` bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))  # type: ignore[arg-type]

    return subprocess.run(
        [sys.executable, "scripts/download_flair.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=limit if file_limit else None,
    )


def test_a_full_disk_is_named_once_not_per_file(
    server: LoopbackServer, release: Release, tmp_path: Path
) -> None:
    # Prepare: files may not grow past 1 kB (each archive is larger): the disk is "full"
    common = ["--base-url", base_url(server), "--no-progress", "--backoff", "0.01"]

    # Execute
    done = run_cli("--dataset-dir", tmp_path / "flair", *common, file_limit=1024)

    # Assert
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("the disk is full") == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("problem", ["dataset-dir-is-a-file", "missing-sha256sums"])
def test_bad_cli_arguments_are_one_line(
    problem: str, server: LoopbackServer, tmp_path: Path
) -> None:
    # Prepare
    args: list[str | Path] = ["--base-url", base_url(server), "--no-progress"]
    if problem == "dataset-dir-is-a-file":
        (tmp_path / "f").write_text("x")
        args += ["--dataset-dir", tmp_path / "f"]
    else:
        args += ["--dataset-dir", tmp_path / "d", "--sha256sums", tmp_path / "missing.txt"]

    # Execute
    done = run_cli(*args)

    # Assert
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert (
        str(tmp_path / ("f" if problem == "dataset-dir-is-a-file" else "missing.txt"))
        in done.stderr
    )


def test_fetch_refuses_a_name_outside_the_destination(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="outside"):
        fetch_all([RemoteFile("http://127.0.0.1:9/x", "../x")], tmp_path / "d", progress=False)
