"""Damaged data files fail with one clear error naming file, split, user and values.

Every case damages a real file: a prepared HDF5 file (edited with h5py or overwritten
byte-wise) or a raw FLAIR directory (a JPEG cut in half).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.prepare import NUM_IMAGES_INDEX, Layout, prepare_flair
from flair_fl.data.raw import IMAGE_DIR, METADATA_FILE
from flair_fl.data.source import open_reader
from flair_fl.data.synthetic import SyntheticSpec, generate_synthetic_flair
from flair_fl.errors import FlairFormatError


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_flair(
        tmp_path_factory.mktemp("raw"), SyntheticSpec(num_users=8, image_size=16, seed=5)
    )


@pytest.fixture(scope="module")
def prepared(small_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("prepared")
    layouts: tuple[Layout, ...] = ("pfl", "mlflair")
    return {
        layout: prepare_flair(small_raw, out / f"{layout}.hdf5", layout=layout, progress=False)
        for layout in layouts
    }


def damaged_copy(prepared: dict[str, Path], layout: str, tmp_path: Path) -> Path:
    """A private copy of a prepared file, for a test to damage."""
    return Path(shutil.copyfile(prepared[layout], tmp_path / f"damaged-{layout}.hdf5"))


def first_user(path: Path) -> tuple[str, str]:
    with h5py.File(path, "r") as h5:
        return "train", next(iter(h5["train"]))


def truncate_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_head(path: Path) -> None:
    with path.open("r+b") as f:
        f.write(random.Random(0).randbytes(4096))


@pytest.mark.parametrize("damage", [truncate_to_half, random_head])
def test_corrupted_hdf5_names_the_file_and_how_to_recreate_it(
    damage: object, prepared: dict[str, Path], tmp_path: Path
) -> None:
    # Prepare
    path = damaged_copy(prepared, "pfl", tmp_path)
    damage(path)  # type: ignore[operator]

    # Execute
    with pytest.raises(FlairFormatError) as err:
        open_reader(path)

    # Assert
    message = str(err.value)
    assert str(path) in message and "truncated or corrupted" in message
    assert "scripts/prepare_flair.py" in message and f"--output {path}" in message


def test_corrupted_user_group_is_named_when_read(prepared: dict[str, Path], tmp_path: Path) -> None:
    # Prepare: the file opens, but one user's images header is garbage
    path = damaged_copy(prepared, "pfl", tmp_path)
    split, user = first_user(path)
    with h5py.File(path, "r") as h5:
        header = h5py.h5o.get_info(h5[f"{split}/{user}/images"].id).addr
    with path.open("r+b") as f:
        f.seek(header)
        f.write(b"\x5a" * 64)
    reader = FlairHDF5(path)

    # Execute
    with pytest.raises(FlairFormatError) as err:
        reader.read_user(split, user)

    # Assert
    message = str(err.value)
    assert str(path) in message and f"user {user} of split '{split}'" in message
    assert "truncated or corrupted" in message and "scripts/prepare_flair.py" in message


@pytest.mark.parametrize("with_index", [True, False])
def test_user_without_images_is_left_out_with_one_warning(
    with_index: bool,
    prepared: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: two empty users in train (also listed, with 0 images, in our index)
    path = damaged_copy(prepared, "pfl", tmp_path)
    with h5py.File(path, "a") as h5:
        for user in ("empty-1", "empty-2"):
            group = h5.create_group(f"train/{user}")
            group["image_ids"] = np.zeros(0, dtype="S1")
            group["images"] = np.zeros((0, 16, 16, 3), dtype=np.uint8)
            for key in ("labels", "fine_grained_labels"):
                group[f"{key}_row"] = np.zeros(0, dtype=np.uint16)
                group[f"{key}_col"] = np.zeros(0, dtype=np.uint8)
        index = json.loads(h5[NUM_IMAGES_INDEX][()])
        expected = dict(index["train"])  # the users with images
        del h5[NUM_IMAGES_INDEX]
        if with_index:
            index["train"].update({"empty-1": 0, "empty-2": 0})
            h5[NUM_IMAGES_INDEX] = json.dumps(index)
    reader = FlairHDF5(path)

    # Execute
    with caplog.at_level(logging.WARNING, logger="flair_fl.data.hdf5"):
        population = reader.population("train")
        again = reader.population("train")
    with pytest.raises(FlairFormatError) as err:
        reader.read_user("train", "empty-1")

    # Assert
    assert population == again == expected
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "2 user(s) of split 'train' have no images" in warnings[0]
    assert "empty-1" in warnings[0]
    assert "user empty-1 of split 'train' has no images" in str(err.value)


def test_images_and_labels_of_different_lengths(prepared: dict[str, Path], tmp_path: Path) -> None:
    # Prepare: drop the last label string of a user (ml-flair layout: one per image)
    path = damaged_copy(prepared, "mlflair", tmp_path)
    split, user = first_user(path)
    with h5py.File(path, "a") as h5:
        labels = h5[f"{split}/{user}/labels"][()]
        n_images = len(labels)
        del h5[f"{split}/{user}/labels"]
        h5[f"{split}/{user}/labels"] = labels[:-1]
    reader = FlairHDF5(path)

    # Execute
    with pytest.raises(FlairFormatError) as err:
        reader.read_user(split, user)

    # Assert
    message = str(err.value)
    assert str(path) in message and f"split '{split}', user {user}" in message
    assert f"{n_images} images but {n_images - 1} entries in 'labels'" in message


def test_label_index_outside_the_mapping(prepared: dict[str, Path], tmp_path: Path) -> None:
    # Prepare: point one label of a user at index 17 of the 17-label coarse mapping
    path = damaged_copy(prepared, "pfl", tmp_path)
    split, user = first_user(path)
    with h5py.File(path, "a") as h5:
        cols = h5[f"{split}/{user}/labels_col"]
        cols[0] = 17
    reader = FlairHDF5(path)
    assert reader.num_labels("coarse") == 17

    # Execute
    with pytest.raises(FlairFormatError) as read_err:
        reader.read_user(split, user)
    with pytest.raises(FlairFormatError) as labels_err:
        reader.read_labels(split, user)

    # Assert
    for err in (read_err, labels_err):
        message = str(err.value)
        assert str(path) in message and f"split '{split}', user {user}" in message
        assert "label index 17 is outside the label mapping of 17 labels" in message


def test_truncated_jpeg_fails_prepare_and_leaves_no_output(small_raw: Path, tmp_path: Path) -> None:
    # Prepare: cut a JPEG of the last user in half (headers kept: only decoding notices)
    raw = Path(shutil.copytree(small_raw, tmp_path / "raw"))
    record = json.loads((raw / METADATA_FILE).read_text())[-1]
    image = raw / IMAGE_DIR / f"{record['image_id']}.jpg"
    data = image.read_bytes()
    start_of_scan = data.index(b"\xff\xda")
    image.write_bytes(data[: start_of_scan + (len(data) - start_of_scan) // 2])
    out = tmp_path / "out"

    # Execute
    with pytest.raises(FlairFormatError) as err:
        prepare_flair(raw, out / "flair.hdf5", progress=False)

    # Assert: the file is named; neither the output nor its .partial is left
    assert str(image) in str(err.value) and "unreadable or truncated" in str(err.value)
    assert list(out.iterdir()) == []
