"""Data that could not be read back is refused at prepare; damage is detected on read with
checksums; user-facing failures are one line (issue 15, items 7 and 9)."""

from __future__ import annotations

import io
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flair_fl.artifacts.summarize import find_jobs
from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.prepare import prepare_flair, prepare_parquet
from flair_fl.data.raw import IMAGE_DIR, METADATA_FILE
from flair_fl.errors import FlairFormatError
from tests.test_parquet import write_hf_parquet

REPO = Path(__file__).resolve().parents[1]


def copy_raw(tiny_raw: Path, tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    return raw


def edit_records(raw: Path, change: object) -> list[dict[str, object]]:
    records = json.loads((raw / METADATA_FILE).read_text())
    change(records)  # type: ignore[operator]
    (raw / METADATA_FILE).write_text(json.dumps(records))
    return records  # type: ignore[no-any-return]


@pytest.mark.parametrize("user_id", ["a/b", "", ".", "..", "a\0b", "a\\b"])
def test_user_id_hdf5_cannot_hold_is_refused_naming_the_record(
    user_id: str, tiny_raw: Path, tmp_path: Path
) -> None:
    # Prepare: every image of the first record's user gets the bad id
    raw = copy_raw(tiny_raw, tmp_path)

    def rename(records: list[dict[str, object]]) -> None:
        first = records[0]["user_id"]
        for record in records:
            if record["user_id"] == first:
                record["user_id"] = user_id

    edit_records(raw, rename)

    # Execute
    with pytest.raises(FlairFormatError, match="cannot be stored") as err:
        prepare_flair(raw, tmp_path / "f.h5", progress=False)

    # Assert
    assert "record 0" in str(err.value) and repr(user_id) in str(err.value)
    assert not list(tmp_path.glob("f.h5*"))


def test_bad_user_id_in_parquet_is_refused_naming_file_and_row(
    tiny_raw: Path, tmp_path: Path
) -> None:
    # Prepare
    data = write_hf_parquet(tiny_raw, tmp_path / "hf")
    shard = sorted(data.glob("train-*.parquet"))[0]
    table = pq.read_table(shard).to_pylist()
    table[3]["user_id"] = "../escape"
    pq.write_table(pq.read_table(shard).from_pylist(table, schema=pq.read_schema(shard)), shard)

    # Execute
    with pytest.raises(FlairFormatError, match="cannot be stored") as err:
        prepare_parquet([data], tmp_path / "f.h5", progress=False)

    # Assert
    assert f"{shard}: row 3" in str(err.value)


def test_jpeg_store_refuses_bytes_that_are_not_jpeg(tiny_raw: Path, tmp_path: Path) -> None:
    # Prepare: one image is a PNG under its .jpg name (PIL decodes it; the store could not)
    raw = copy_raw(tiny_raw, tmp_path)
    victim = sorted((raw / IMAGE_DIR).glob("*.jpg"))[5]
    buffer = io.BytesIO()
    Image.open(victim).save(buffer, format="PNG")
    victim.write_bytes(buffer.getvalue())

    # Execute
    with pytest.raises(FlairFormatError, match="not a JPEG") as err:
        prepare_flair(raw, tmp_path / "f.h5", store="jpeg", progress=False)
    pixels = prepare_flair(raw, tmp_path / "u.h5", store="uint8", progress=False)

    # Assert: named; the pixel store, which keeps no JPEG bytes, takes it
    assert str(victim) in str(err.value)
    assert not (tmp_path / "f.h5").exists() and pixels.is_file()


def test_empty_record_list_is_an_error(tiny_raw: Path, tmp_path: Path) -> None:
    raw = copy_raw(tiny_raw, tmp_path)
    edit_records(raw, lambda records: records.clear())
    with pytest.raises(FlairFormatError, match="no image records"):
        prepare_flair(raw, tmp_path / "f.h5", progress=False)


def flip_a_byte(path: Path, store: str) -> None:
    """Flip one bit inside the stored image bytes of the first train user."""
    with h5py.File(path, "r") as h5:
        user = h5["train"][next(iter(h5["train"]))]
        if store == "jpeg":
            marker = user["images"][0].tobytes()[-64:-32]  # entropy-coded: unique
        else:
            marker = user["images"][0].tobytes()[1000:1032]
    data = bytearray(path.read_bytes())
    at = data.find(marker)
    assert at > 0 and data.find(marker, at + 1) == -1  # the image's bytes, found once
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("store", ["uint8", "jpeg"])
@pytest.mark.parametrize("checksum", [True, False])
def test_checksums_detect_a_flipped_byte_on_read(
    store: str, checksum: bool, tiny_raw: Path, tmp_path: Path
) -> None:
    # Prepare
    path = prepare_flair(
        tiny_raw, tmp_path / "f.h5", store=store, checksum=checksum, progress=False
    )
    with h5py.File(path, "r") as h5:  # not through the reader: it caches its handle
        user = next(iter(h5["train"]))
    flip_a_byte(path, store)
    damaged = FlairHDF5(path)

    # Execute / Assert: with checksums a clear error naming the file and the user's data;
    # without, the changed pixels (or a decoder's complaint, at best) are all there is
    if checksum:
        with pytest.raises(FlairFormatError) as err:
            damaged.read_user("train", user)
        assert str(path) in str(err.value) and user in str(err.value)
        assert ("fletcher32" if store == "uint8" else "CRC-32") in str(err.value)
    else:
        try:
            after = damaged.read_user("train", user).images
        except FlairFormatError:
            return  # the JPEG decoder noticed this one
        clean = FlairHDF5(prepare_flair(tiny_raw, tmp_path / "c.h5", store=store, progress=False))
        assert not np.array_equal(clean.read_user("train", user).images, after)


def test_prepare_cli_on_a_full_disk_stops_in_one_line_and_removes_its_partial(
    tiny_raw: Path, tmp_path: Path
) -> None:
    # Prepare: files may grow to 200 kB (the output needs more): a "full" disk, as in
    # tests/test_durable_outputs.py
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "out"

    # Execute
    done = subprocess.run(
        [sys.executable, "scripts/prepare_flair.py", "--dataset-dir", str(tiny_raw),
         "--output", str(out / "f.h5"), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False, preexec_fn=limit,
    )  # fmt: skip

    # Assert
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "the disk is full" in done.stderr and str(out / "f.h5") in done.stderr
    assert list(out.iterdir()) == []


def test_corrupted_parquet_row_group_names_the_file(tiny_raw: Path, tmp_path: Path) -> None:
    # Prepare: overwrite the middle of a shard's image pages (the footer stays readable)
    data = write_hf_parquet(tiny_raw, tmp_path / "hf")
    shard = sorted(data.glob("train-*.parquet"))[0]
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = b"\xff" * 4096
    shard.write_bytes(bytes(raw))

    # Execute
    with pytest.raises(FlairFormatError) as err:
        prepare_parquet([data], tmp_path / "f.h5", progress=False)

    # Assert
    assert str(shard) in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.glob("f.h5*"))


def test_summarize_skips_a_torn_summary_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: two jobs, the second's summary.json torn mid-write
    for number, text in ((0, '{"best_val_macro_ap": 0.5}'), (1, '{"best_val_mac')):
        job = tmp_path / str(number)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={number}\n")
        (job / "summary.json").write_text(text)

    # Execute
    jobs = find_jobs(tmp_path)

    # Assert
    assert [job.summary for job in jobs] == [{"best_val_macro_ap": 0.5}, None]
    assert "cannot be read" in (jobs[1].error or "")
    assert str(tmp_path / "1" / "summary.json") in capsys.readouterr().err


def test_a_shared_dir_too_small_for_one_model_is_one_line_naming_the_fix(
    tmp_path: Path,
) -> None:
    # Prepare: in a child whose files may not exceed 1 MB, a 45 MB model (ResNet18-sized)
    script = f"""
import resource, signal
from flair_fl.errors import ConfigError
from flair_fl.federated.transport import SharedTransport
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
transport = SharedTransport({str(tmp_path)!r})
try:
    transport.check_room(45 << 20)
except ConfigError as err:
    print(err)
"""

    # Execute
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )

    # Assert: named path and fixes, and the transport's directory is gone
    assert done.returncode == 0, done.stderr
    assert str(tmp_path) in done.stdout and "simulation.transport=message" in done.stdout
    assert "90 MiB" in done.stdout and list(tmp_path.iterdir()) == []
