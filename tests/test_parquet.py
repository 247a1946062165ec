"""The Hugging Face route: parquet files in apple/flair's schema -> the same HDF5."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flair_fl.data.download import RetryPolicy
from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.prepare import Layout, Store, prepare_flair, prepare_parquet
from flair_fl.data.raw import IMAGE_DIR, METADATA_FILE
from flair_fl.data.release import download_hub_parquet
from flair_fl.errors import DownloadError, FlairFormatError
from tests.h5_contents import hdf5_contents
from tests.loopback import LoopbackServer

REPO = Path(__file__).resolve().parents[1]
HF_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("image_id", pa.int64()),
        ("labels", pa.list_(pa.string())),
        ("partition", pa.string()),
        ("fine_grained_labels", pa.list_(pa.string())),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ]
)
SHARDS = {"train": 2, "val": 1, "test": 1}  # apple/flair has 10 / 2 / 2


def hf_rows(raw: Path, interleave: bool) -> dict[str, list[dict[str, Any]]]:
    """Rows per split; `interleave` mixes users (each user's images keep their order)."""
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SHARDS}
    for record in json.loads((raw / METADATA_FILE).read_text()):
        jpeg = (raw / IMAGE_DIR / f"{record['image_id']}.jpg").read_bytes()
        row = {**record, "image_id": int(record["image_id"])}
        row["image"] = {"bytes": jpeg, "path": f"{record['image_id']}.jpg"}
        rows[record["partition"]].append(row)
    if interleave:
        for split, split_rows in rows.items():
            by_user: dict[str, list[dict[str, Any]]] = {}
            for row in split_rows:
                by_user.setdefault(row["user_id"], []).append(row)
            mixed = itertools.zip_longest(*by_user.values())
            rows[split] = [row for group in mixed for row in group if row is not None]
    return rows


def write_hf_parquet(raw: Path, out: Path, interleave: bool = False) -> Path:
    """`raw` as apple/flair's data/<split>-0000i-of-0000n.parquet files (small row groups)."""
    data = out / "data"
    data.mkdir(parents=True)
    for split, rows in hf_rows(raw, interleave).items():
        shards = SHARDS[split]
        for i in range(shards):
            part = rows[i * len(rows) // shards : (i + 1) * len(rows) // shards]
            table = pa.Table.from_pylist(part, schema=HF_SCHEMA)
            pq.write_table(
                table, data / f"{split}-{i:05d}-of-{shards:05d}.parquet", row_group_size=40
            )
    return data


@pytest.fixture(scope="module")
def parquet_dir(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_parquet(tiny_raw, tmp_path_factory.mktemp("hf"), interleave=True)


@pytest.mark.parametrize(
    ("layout", "store"), [("pfl", "uint8"), ("mlflair", "uint8"), ("pfl", "jpeg")]
)
def test_parquet_route_writes_the_same_hdf5_as_the_raw_route(
    layout: Layout, store: Store, tiny_raw: Path, parquet_dir: Path, tmp_path: Path
) -> None:
    # Prepare: parquet rows interleave users, unlike the raw JSON

    # Execute
    from_raw = prepare_flair(tiny_raw, tmp_path / "raw.h5", layout, False, store)
    from_parquet = prepare_parquet([parquet_dir], tmp_path / "pq.h5", layout, False, store)

    # Assert: every dataset and attribute, byte for byte
    assert hdf5_contents(from_parquet) == hdf5_contents(from_raw)


def test_parquet_route_central_layout_reads_the_same(
    tiny_raw: Path, tiny_hdf5: Path, parquet_dir: Path, tmp_path: Path
) -> None:
    # Execute
    central = FlairHDF5(prepare_parquet([parquet_dir], tmp_path / "c.h5", "central", False))
    reference = FlairHDF5(tiny_hdf5)

    # Assert
    assert central.layout == "central"
    for split in ("train", "val", "test"):
        assert central.population(split) == reference.population(split)
        for user in reference.population(split):
            got, want = (
                central.read_user(split, user, "fine"),
                reference.read_user(split, user, "fine"),
            )
            np.testing.assert_array_equal(got.images, want.images)
            np.testing.assert_array_equal(got.targets, want.targets)


def rewrite(file: Path, change: Any) -> None:
    table = pq.read_table(file)
    pq.write_table(change(table), file)


def test_missing_column_is_named(parquet_dir: Path, tmp_path: Path) -> None:
    # Prepare
    file = tmp_path / "x.parquet"
    pq.write_table(pq.read_table(parquet_dir / "val-00000-of-00001.parquet").drop(["labels"]), file)

    # Execute
    with pytest.raises(FlairFormatError) as err:
        prepare_parquet([file], tmp_path / "out.h5", progress=False)

    # Assert
    assert str(file) in str(err.value) and "'labels'" in str(err.value)
    assert not (tmp_path / "out.h5").exists()


def test_bad_partition_names_file_and_row(parquet_dir: Path, tmp_path: Path) -> None:
    # Prepare: row 3 of the val file says "dev"
    file = tmp_path / "val.parquet"
    table = pq.read_table(parquet_dir / "val-00000-of-00001.parquet")
    partitions = table.column("partition").to_pylist()
    partitions[3] = "dev"
    table = table.set_column(3, "partition", pa.array(partitions))
    pq.write_table(table, file)

    # Execute
    with pytest.raises(FlairFormatError, match=r"val\.parquet: row 3: unknown partition 'dev'"):
        prepare_parquet([file], tmp_path / "out.h5", progress=False)


def test_user_in_two_splits_is_refused(parquet_dir: Path, tmp_path: Path) -> None:
    # Prepare: a val file whose first user also appears in a copy labelled test
    val = pq.read_table(parquet_dir / "val-00000-of-00001.parquet").slice(0, 1)
    test = val.set_column(3, "partition", pa.array(["test"]))
    test = test.set_column(1, "image_id", pa.array([1], pa.int64()))
    pq.write_table(val, tmp_path / "a.parquet")
    pq.write_table(test, tmp_path / "b.parquet")

    # Execute
    with pytest.raises(FlairFormatError, match="two partitions") as err:
        prepare_parquet([tmp_path], tmp_path / "out.h5", progress=False)

    # Assert: the second file and its row are named
    assert f"{tmp_path / 'b.parquet'}: row 0" in str(err.value)


# --- Hugging Face Hub -----------------------------------------------------------------


@pytest.fixture
def hub(parquet_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackServer]:
    """The Hub's tree API (two pages, as it paginates) and resolve URLs for apple/flair."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy setting must not catch loopback
    with LoopbackServer() as server:
        entries = []
        for file in sorted(parquet_dir.iterdir()):
            data = file.read_bytes()
            path = f"data/{file.name}"
            server.served.files[f"/datasets/apple/flair/resolve/main/{path}"] = data
            lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append({"type": "file", "path": path, "size": len(data), "lfs": lfs})
        entries.append({"type": "file", "path": "README.md", "size": 10})
        first = "/api/datasets/apple/flair/tree/main?recursive=true"
        second = first + "&cursor=2"
        server.served.files[first] = json.dumps(entries[:2]).encode()
        server.served.files[second] = json.dumps(entries[2:]).encode()
        server.served.headers[first] = {"Link": f'<{server.url}{second}>; rel="next"'}
        yield server


def test_hub_route_downloads_verified_files_that_prepare_like_the_raw_route(
    hub: LoopbackServer, tiny_hdf5: Path, tmp_path: Path
) -> None:
    # Execute
    files = download_hub_parquet(tmp_path / "hf", hub.url, progress=False)
    output = prepare_parquet([tmp_path / "hf" / "data"], tmp_path / "flair.h5", progress=False)

    # Assert
    assert [f.name for f in files] == sorted(
        f"{s}-{i:05d}-of-{n:05d}.parquet" for s, n in SHARDS.items() for i in range(n)
    )
    assert hdf5_contents(output) == hdf5_contents(tiny_hdf5)


def test_hub_file_with_wrong_digest_is_refused(hub: LoopbackServer, tmp_path: Path) -> None:
    # Prepare: the served bytes of one file no longer match the digest the listing gives
    path = "/datasets/apple/flair/resolve/main/data/val-00000-of-00001.parquet"
    data = bytearray(hub.served.files[path])
    data[100] ^= 0xFF
    hub.served.files[path] = bytes(data)

    # Execute
    with pytest.raises(DownloadError, match="SHA-256"):
        download_hub_parquet(tmp_path, hub.url, policy=RetryPolicy(2, 0.01, 10), progress=False)

    # Assert
    assert not list((tmp_path / "data").glob("val-*"))


def test_prepare_cli_reads_parquet(parquet_dir: Path, tmp_path: Path) -> None:
    # Execute
    done = subprocess.run(
        [sys.executable, "scripts/prepare_flair.py", "--parquet", str(parquet_dir),
         "--output", str(tmp_path / "f.h5"), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    # Assert
    assert done.returncode == 0, done.stderr
    assert "470 images" in done.stdout and "images/s" in done.stdout
