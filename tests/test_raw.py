"""Every kind of damaged raw FLAIR directory raises a FlairFormatError naming file and record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from flair_fl.data.prepare import prepare_flair
from flair_fl.data.raw import IMAGE_DIR, METADATA_FILE, RELATIONSHIP_FILE, load_raw_flair
from flair_fl.data.synthetic import SyntheticSpec, generate_synthetic_flair
from flair_fl.errors import FlairFormatError


@pytest.fixture(scope="module")
def pristine_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_flair(
        tmp_path_factory.mktemp("pristine"), SyntheticSpec(num_users=8, image_size=16, seed=5)
    )


@pytest.fixture
def raw_copy(pristine_raw: Path, tmp_path: Path) -> Path:
    """A private copy of a valid raw directory, for a test to damage."""
    return Path(shutil.copytree(pristine_raw, tmp_path / "raw"))


def read_records(root: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads((root / METADATA_FILE).read_text())
    return records


def write_records(root: Path, records: list[dict[str, Any]]) -> None:
    (root / METADATA_FILE).write_text(json.dumps(records))


def image_file(root: Path, record: dict[str, Any]) -> Path:
    return root / IMAGE_DIR / f"{record['image_id']}.jpg"


def test_pristine_copy_loads(raw_copy: Path) -> None:
    # Prepare: an undamaged copy (the baseline every other test damages)
    expected = len(read_records(raw_copy))

    # Execute
    raw = load_raw_flair(raw_copy)

    # Assert
    assert len(raw.records) == expected


def test_missing_image_names_file_and_record(raw_copy: Path) -> None:
    # Prepare
    record = read_records(raw_copy)[4]
    image_file(raw_copy, record).unlink()

    # Execute
    with pytest.raises(FlairFormatError) as err:
        load_raw_flair(raw_copy)

    # Assert
    message = str(err.value)
    assert str(image_file(raw_copy, record)) in message
    assert "record 4" in message and record["image_id"] in message
    assert "missing" in message


def test_unknown_partition(raw_copy: Path) -> None:
    # Prepare
    records = read_records(raw_copy)
    records[2]["partition"] = "validation"
    write_records(raw_copy, records)

    # Execute
    with pytest.raises(FlairFormatError) as err:
        load_raw_flair(raw_copy)

    # Assert
    message = str(err.value)
    assert str(raw_copy / METADATA_FILE) in message
    assert "record 2" in message and records[2]["image_id"] in message
    assert "'validation'" in message


@pytest.mark.parametrize("field", ["user_id", "labels", "fine_grained_labels", "partition"])
def test_record_missing_a_field(raw_copy: Path, field: str) -> None:
    # Prepare
    records = read_records(raw_copy)
    del records[3][field]
    write_records(raw_copy, records)

    # Execute
    with pytest.raises(FlairFormatError) as err:
        load_raw_flair(raw_copy)

    # Assert
    message = str(err.value)
    assert str(raw_copy / METADATA_FILE) in message
    assert "record 3" in message and records[3]["image_id"] in message
    assert f"missing field '{field}'" in message


def test_user_in_two_partitions(raw_copy: Path) -> None:
    # Prepare: move the second image of a user with several images to another split
    records = read_records(raw_copy)
    first_seen: dict[str, int] = {}
    index = next(i for i, r in enumerate(records) if first_seen.setdefault(r["user_id"], i) != i)
    user = records[index]["user_id"]
    records[index]["partition"] = "test" if records[index]["partition"] != "test" else "val"
    write_records(raw_copy, records)

    # Execute
    with pytest.raises(FlairFormatError) as err:
        load_raw_flair(raw_copy)

    # Assert
    message = str(err.value)
    assert str(raw_copy / METADATA_FILE) in message
    assert f"record {index}" in message and records[index]["image_id"] in message
    assert user in message and "two partitions" in message


def test_fine_label_without_coarse_mapping(raw_copy: Path) -> None:
    # Prepare: drop the relationship line of a fine label that the first record uses
    records = read_records(raw_copy)
    fine = records[0]["fine_grained_labels"][0]
    relationship = raw_copy / RELATIONSHIP_FILE
    lines = relationship.read_text().splitlines()
    relationship.write_text("\n".join(x for x in lines if not x.startswith(f"{fine} ->")) + "\n")

    # Execute
    with pytest.raises(FlairFormatError) as err:
        load_raw_flair(raw_copy)

    # Assert
    message = str(err.value)
    assert str(raw_copy / METADATA_FILE) in message and str(relationship) in message
    assert "record 0" in message and records[0]["image_id"] in message
    assert repr(fine) in message and "no coarse mapping" in message


def test_malformed_label_relationship_line(raw_copy: Path) -> None:
    # Prepare
    relationship = raw_copy / RELATIONSHIP_FILE
    lines = relationship.read_text().splitlines()
    lines.insert(5, "wood_processed => material")
    relationship.write_text("\n".join(lines) + "\n")

    # Execute
    with pytest.raises(FlairFormatError) as err:
        load_raw_flair(raw_copy)

    # Assert
    message = str(err.value)
    assert str(relationship) in message
    assert "line 6" in message and "wood_processed => material" in message


def test_missing_metadata_says_how_to_get_the_data(raw_copy: Path) -> None:
    # Prepare
    (raw_copy / METADATA_FILE).unlink()

    # Execute
    with pytest.raises(FlairFormatError) as err:
        load_raw_flair(raw_copy)

    # Assert
    message = str(err.value)
    assert str(raw_copy / METADATA_FILE) in message
    assert "scripts/download_flair.py" in message and "scripts/make_synthetic.py" in message


def truncate_jpeg_in_half(path: Path) -> None:
    """Keep the headers and half of the entropy-coded data (after the SOS marker)."""
    data = path.read_bytes()
    start_of_scan = data.index(b"\xff\xda")
    path.write_bytes(data[: start_of_scan + (len(data) - start_of_scan) // 2])


def write_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a JPEG file \x00\x01\x02" * 8)


def test_truncated_jpeg_still_has_a_parsable_header(raw_copy: Path) -> None:
    # Prepare: the truncation case must only be detectable by decoding every byte
    path = image_file(raw_copy, read_records(raw_copy)[1])
    truncate_jpeg_in_half(path)

    # Execute
    with Image.open(path) as image:
        size = image.size

        # Assert
        assert size == (16, 16)
        with pytest.raises(OSError, match="truncated"):
            image.load()


@pytest.mark.parametrize("damage", [write_garbage, truncate_jpeg_in_half])
def test_damaged_jpeg_fails_when_read(raw_copy: Path, damage: Any) -> None:
    # Prepare
    records = read_records(raw_copy)
    damage(image_file(raw_copy, records[1]))
    raw = load_raw_flair(raw_copy)  # only checks that images exist; decoding is deferred

    # Execute
    with pytest.raises(FlairFormatError) as err:
        raw.read_image(raw.records[1])

    # Assert
    message = str(err.value)
    assert str(image_file(raw_copy, records[1])) in message
    assert f"image_id={records[1]['image_id']}" in message
    assert "unreadable or truncated" in message


@pytest.mark.parametrize("damage", [write_garbage, truncate_jpeg_in_half])
def test_damaged_jpeg_fails_prepare(raw_copy: Path, tmp_path: Path, damage: Any) -> None:
    # Prepare
    record = read_records(raw_copy)[-1]
    damage(image_file(raw_copy, record))

    # Execute
    with pytest.raises(FlairFormatError) as err:
        prepare_flair(raw_copy, tmp_path / "out.hdf5", progress=False)

    # Assert
    assert str(image_file(raw_copy, record)) in str(err.value)
    assert f"image_id={record['image_id']}" in str(err.value)
