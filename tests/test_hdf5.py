"""Raw FLAIR -> HDF5 (three layouts) -> reader and torch datasets."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from flair_fl.data import decode as decode_module
from flair_fl.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SplitDataset,
    UserDataset,
    build_transform,
)
from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.hdf5_layouts import UserData
from flair_fl.data.labels import COARSE_LABELS
from flair_fl.data.prepare import NUM_IMAGES_INDEX, Layout, prepare_flair
from flair_fl.data.raw import IMAGE_DIR, METADATA_FILE
from flair_fl.data.synthetic import SyntheticSpec, generate_synthetic_flair
from flair_fl.errors import FlairFormatError

LAYOUTS: tuple[Layout, ...] = ("pfl", "mlflair", "central")


@dataclass(frozen=True)
class ExpectedUser:
    split: str
    images: np.ndarray  # uint8 (n, H, W, 3), decoded with PIL straight from the JPEGs
    coarse: list[list[str]]
    fine: list[list[str]]


def decode(raw: Path, record: dict[str, Any]) -> np.ndarray:
    with Image.open(raw / IMAGE_DIR / f"{record['image_id']}.jpg") as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def expected(tiny_raw: Path) -> dict[str, ExpectedUser]:
    """Every user of `tiny_raw`, from its JSON and JPEGs, in raw order."""
    by_user: dict[str, list[dict[str, Any]]] = {}
    for record in json.loads((tiny_raw / METADATA_FILE).read_text()):
        by_user.setdefault(record["user_id"], []).append(record)
    return {
        user_id: ExpectedUser(
            split=records[0]["partition"],
            images=np.stack([decode(tiny_raw, r) for r in records]),
            coarse=[r["labels"] for r in records],
            fine=[r["fine_grained_labels"] for r in records],
        )
        for user_id, records in by_user.items()
    }


@pytest.fixture(scope="module")
def prepared(
    tiny_raw: Path, tiny_hdf5: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[Layout, Path]:
    """`tiny_raw` in every layout."""
    out = tmp_path_factory.mktemp("layouts")
    paths: dict[Layout, Path] = {"pfl": tiny_hdf5}
    for layout in ("mlflair", "central"):
        paths[layout] = prepare_flair(
            tiny_raw, out / f"{layout}.hdf5", layout=layout, progress=False
        )
    return paths


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_flair(
        tmp_path_factory.mktemp("small"), SyntheticSpec(num_users=10, image_size=16, seed=11)
    )


def multi_hot(names: list[list[str]], mapping: dict[str, int]) -> np.ndarray:
    targets = np.zeros((len(names), len(mapping)), dtype=np.float32)
    for row, labels in enumerate(names):
        targets[row, [mapping[label] for label in labels]] = 1.0
    return targets


def user_with_most_images(expected: dict[str, ExpectedUser]) -> str:
    return max(expected, key=lambda u: len(expected[u].images))


# --- round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_images_and_targets(
    layout: Layout, prepared: dict[Layout, Path], expected: dict[str, ExpectedUser]
) -> None:
    # Prepare
    reader = FlairHDF5(prepared[layout])
    coarse_map, fine_map = reader.label_mapping("coarse"), reader.label_mapping("fine")

    for user_id, user in expected.items():
        # Execute
        coarse = reader.read_user(user.split, user_id, "coarse")
        fine = reader.read_user(user.split, user_id, "fine")

        # Assert
        np.testing.assert_array_equal(coarse.images, user.images)
        np.testing.assert_array_equal(fine.images, user.images)
        np.testing.assert_array_equal(coarse.targets, multi_hot(user.coarse, coarse_map))
        np.testing.assert_array_equal(fine.targets, multi_hot(user.fine, fine_map))
    assert reader.layout == layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_interleaved_reads_return_each_users_own_data(
    layout: Layout, prepared: dict[Layout, Path], expected: dict[str, ExpectedUser]
) -> None:
    # Prepare: a reader keeps the last user it opened; every way of reading must still
    # give the user asked for, also after its file handle was closed under it.
    reader = FlairHDF5(prepared[layout])
    mapping = reader.label_mapping("coarse")
    users = sorted(expected)
    order = [users[0], users[1], users[0], users[0], users[-1], users[1]]

    for step, user_id in enumerate(order):
        user = expected[user_id]
        if step == 3:
            reader.h5.close()  # the kept user's handles are now invalid

        # Execute
        read = reader.read_user(user.split, user_id, "coarse")
        first = reader.read_image(user.split, user_id, 0)
        labels = reader.read_labels(user.split, user_id, "coarse")
        last = reader.read_images(user.split, user_id, [len(user.images) - 1], "coarse")

        # Assert
        np.testing.assert_array_equal(read.images, user.images)
        np.testing.assert_array_equal(read.targets, multi_hot(user.coarse, mapping))
        np.testing.assert_array_equal(first, user.images[0])
        assert [sorted(x) for x in labels] == [sorted(x) for x in user.coarse]
        np.testing.assert_array_equal(last.images[0], user.images[-1])
    with pytest.raises(FlairFormatError, match="no user"):
        reader.read_user(expected[users[0]].split, "no-such-user")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_label_indices_are_alphabetical(
    layout: Layout, prepared: dict[Layout, Path], expected: dict[str, ExpectedUser]
) -> None:
    # Prepare
    used_fine = sorted({f for user in expected.values() for labels in user.fine for f in labels})

    # Execute
    reader = FlairHDF5(prepared[layout])
    coarse_map, fine_map = reader.label_mapping("coarse"), reader.label_mapping("fine")

    # Assert: all 17 coarse labels even if this small set lacks a rare one
    assert coarse_map == {label: i for i, label in enumerate(sorted(COARSE_LABELS))}
    assert coarse_map["animal"] == 0 and coarse_map["structure"] == 16
    assert fine_map == {label: i for i, label in enumerate(used_fine)}
    assert reader.num_labels("coarse") == 17 and reader.num_labels("fine") == len(used_fine)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_population_matches_raw_counts(
    layout: Layout, prepared: dict[Layout, Path], expected: dict[str, ExpectedUser]
) -> None:
    # Prepare
    reader = FlairHDF5(prepared[layout])

    for split in ("train", "val", "test"):
        # Execute
        population = reader.population(split)

        # Assert
        assert population == {u: len(e.images) for u, e in expected.items() if e.split == split}


def strip_images(source: Path, target: Path, drop_index: bool) -> Path:
    """A copy whose image datasets are empty placeholders (so nothing can read them)."""
    shutil.copyfile(source, target)
    with h5py.File(target, "a") as h5:
        names: list[str] = []
        h5.visititems(
            lambda name, obj: (
                names.append(name) if name.rsplit("/", 1)[-1] in ("images", "image") else None
            )
        )
        for name in names:
            del h5[name]
            h5[name] = np.zeros(0, dtype=np.uint8)
        if drop_index and NUM_IMAGES_INDEX in h5:
            del h5[NUM_IMAGES_INDEX]
    return target


@pytest.mark.parametrize(
    ("layout", "drop_index"),
    [("pfl", False), ("pfl", True), ("mlflair", False), ("mlflair", True), ("central", True)],
)
def test_population_reads_no_image(
    layout: Layout,
    drop_index: bool,
    prepared: dict[Layout, Path],
    expected: dict[str, ExpectedUser],
    tmp_path: Path,
) -> None:
    # Prepare: files as pfl-research / ml-flair write them lack our image-count index
    reader = FlairHDF5(strip_images(prepared[layout], tmp_path / "stripped.hdf5", drop_index))

    # Execute
    population = reader.population("train")

    # Assert
    assert population == {u: len(e.images) for u, e in expected.items() if e.split == "train"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_images_caps_a_user(
    layout: Layout, prepared: dict[Layout, Path], expected: dict[str, ExpectedUser]
) -> None:
    # Prepare
    reader = FlairHDF5(prepared[layout])
    user_id = user_with_most_images(expected)
    user = expected[user_id]
    assert len(user.images) > 3

    # Execute
    capped = reader.read_user(user.split, user_id, "coarse", max_images=3)
    uncapped = reader.read_user(user.split, user_id, "coarse", max_images=10_000)

    # Assert: the first images, in raw order, whatever the layout
    np.testing.assert_array_equal(capped.images, user.images[:3])
    np.testing.assert_array_equal(
        capped.targets, multi_hot(user.coarse[:3], reader.label_mapping())
    )
    assert len(uncapped.images) == len(user.images)


# --- errors ----------------------------------------------------------------------------


def test_missing_file_says_how_to_prepare(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "absent.hdf5"

    # Execute
    with pytest.raises(FlairFormatError) as err:
        FlairHDF5(path)

    # Assert
    assert str(path) in str(err.value) and "scripts/prepare_flair.py" in str(err.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_split_is_named(
    layout: Layout, prepared: dict[Layout, Path], tmp_path: Path
) -> None:
    # Prepare
    path = Path(shutil.copyfile(prepared[layout], tmp_path / "no_test.hdf5"))
    with h5py.File(path, "a") as h5:
        del h5["test"]
    reader = FlairHDF5(path)

    # Execute
    with pytest.raises(FlairFormatError) as err:
        reader.population("test")

    # Assert
    assert str(path) in str(err.value) and "no 'test' split" in str(err.value)
    assert reader.splits() == ["train", "val"]


def test_truncated_hdf5_is_a_format_error(tiny_hdf5: Path, tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "truncated.hdf5"
    data = tiny_hdf5.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    # Execute
    with pytest.raises(FlairFormatError) as err:
        FlairHDF5(path)

    # Assert
    assert str(path) in str(err.value) and "truncated or corrupted" in str(err.value)


# --- prepare is atomic -----------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prepare_writes_via_partial(
    layout: Layout, small_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record the output folder's content whenever an image is decoded
    listings: set[tuple[str, ...]] = set()
    decode_image = decode_module.decode_image

    def spy(data: bytes, where: str) -> np.ndarray:
        listings.add(tuple(sorted(p.name for p in tmp_path.iterdir())))
        return decode_image(data, where)

    monkeypatch.setattr(decode_module, "decode_image", spy)

    # Execute
    output = prepare_flair(small_raw, tmp_path / "flair.hdf5", layout=layout, progress=False)

    # Assert
    assert listings == {("flair.hdf5.partial",)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flair.hdf5"]
    assert FlairHDF5(output).layout == layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_interrupted_prepare_leaves_no_file(
    layout: Layout, small_raw: Path, tmp_path: Path
) -> None:
    # Prepare: corrupt the JPEG of a user halfway through the write order
    raw = Path(shutil.copytree(small_raw, tmp_path / "raw"))
    records = json.loads((raw / METADATA_FILE).read_text())
    users = list(dict.fromkeys(r["user_id"] for r in records))
    victim = next(r for r in records if r["user_id"] == users[len(users) // 2])
    (raw / IMAGE_DIR / f"{victim['image_id']}.jpg").write_bytes(b"\xff\xd8 corrupted")
    out = tmp_path / "out"
    out.mkdir()

    # Execute
    with pytest.raises(FlairFormatError, match=victim["image_id"]):
        prepare_flair(raw, out / "flair.hdf5", layout=layout, progress=False)

    # Assert
    assert list(out.iterdir()) == []


# --- torch datasets --------------------------------------------------------------------


def constant_user(values: tuple[int, int, int], n: int = 4, size: int = 32) -> UserData:
    images = np.broadcast_to(np.array(values, dtype=np.uint8), (n, size, size, 3)).copy()
    return UserData(images, np.zeros((n, 17), dtype=np.float32))


def test_user_dataset_without_transform(tiny_hdf5: Path, expected: dict[str, ExpectedUser]) -> None:
    # Prepare
    user_id = user_with_most_images(expected)
    user = expected[user_id]

    # Execute
    dataset = UserDataset.from_file(
        FlairHDF5(tiny_hdf5), user.split, user_id, "coarse", max_images=5
    )
    image, target = dataset[4]

    # Assert: uint8 CHW, targets float32
    assert len(dataset) == 5
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image, torch.from_numpy(user.images[4]).permute(2, 0, 1))
    assert target.dtype == torch.float32 and target.shape == (17,)


@pytest.mark.parametrize(("train", "size"), [(True, 24), (False, 20), (False, 48)])
def test_transform_output_size_and_normalisation(train: bool, size: int) -> None:
    # Prepare: a constant image stays constant under any crop, flip and resize
    values = (30, 128, 250)
    dataset = UserDataset(constant_user(values), build_transform(train=train, size=size))

    # Execute
    image, _ = dataset[0]

    # Assert
    assert image.dtype == torch.float32 and image.shape == (3, size, size)
    for channel, value in enumerate(values):
        want = (value / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        torch.testing.assert_close(
            image[channel], torch.full((size, size), want), atol=1e-5, rtol=0
        )


def ramp_user(n: int = 1, size: int = 32) -> UserData:
    """Images whose pixel values grow from left to right."""
    ramp = np.broadcast_to((np.arange(size) * 8).astype(np.uint8)[None, :, None], (size, size, 3))
    return UserData(np.stack([ramp] * n), np.zeros((n, 17), dtype=np.float32))


def left_brighter_than_right(image: torch.Tensor) -> bool:
    return bool(image[:, :, 0].mean() > image[:, :, -1].mean())


def test_train_transform_flips_half_the_time() -> None:
    # Prepare
    dataset = UserDataset(ramp_user(), build_transform(train=True, size=16))
    torch.manual_seed(0)

    # Execute
    flipped = sum(left_brighter_than_right(dataset[0][0]) for _ in range(100))

    # Assert: Binomial(100, 0.5) lies in [25, 75] except with probability ~1e-6
    assert 25 <= flipped <= 75


def test_eval_transform_is_deterministic() -> None:
    # Prepare
    dataset = UserDataset(ramp_user(), build_transform(train=False, size=16))

    # Execute
    images = [dataset[0][0] for _ in range(10)]

    # Assert: no random flip or crop
    assert not any(left_brighter_than_right(image) for image in images)
    assert all(torch.equal(image, images[0]) for image in images)


@pytest.mark.parametrize("cap", [None, 2])
def test_split_dataset_walks_every_user(
    cap: int | None, tiny_hdf5: Path, expected: dict[str, ExpectedUser]
) -> None:
    # Prepare
    reader = FlairHDF5(tiny_hdf5)
    users = list(reader.population("val"))
    mapping = reader.label_mapping()
    want_images = np.concatenate([expected[u].images[:cap] for u in users])
    want_targets = np.concatenate([multi_hot(expected[u].coarse[:cap], mapping) for u in users])

    # Execute
    dataset = SplitDataset(reader, "val", "coarse", max_images_per_user=cap)
    items = [dataset[i] for i in range(len(dataset))]

    # Assert
    assert len(dataset) == len(want_images)
    assert torch.equal(
        torch.stack([image for image, _ in items]),
        torch.from_numpy(want_images).permute(0, 3, 1, 2),
    )
    assert torch.equal(torch.stack([target for _, target in items]), torch.from_numpy(want_targets))
    with pytest.raises(IndexError):
        dataset[len(dataset)]


# --- pickling --------------------------------------------------------------------------


def test_reader_pickles_and_reads_in_a_spawned_process(
    prepared: dict[Layout, Path], expected: dict[str, ExpectedUser]
) -> None:
    # Prepare: readers that already hold an open (unpicklable) handle in this process
    user_id = user_with_most_images(expected)
    split = expected[user_id].split
    readers = {layout: FlairHDF5(path) for layout, path in prepared.items()}
    here = {layout: reader.read_user(split, user_id, "fine") for layout, reader in readers.items()}
    with pytest.raises(TypeError):
        pickle.dumps(readers["pfl"].h5)

    # Execute: bound methods pickle their reader; the child opens its own handle
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        there = {
            layout: pool.apply(reader.read_user, (split, user_id, "fine"))
            for layout, reader in readers.items()
        }
        population = pool.apply(readers["central"].population, ("train",))

    # Assert
    for layout in LAYOUTS:
        np.testing.assert_array_equal(there[layout].images, here[layout].images)
        np.testing.assert_array_equal(there[layout].targets, here[layout].targets)
    assert population == readers["pfl"].population("train")


# --- image order -----------------------------------------------------------------------


def _mlflair_central_copy(source: Path, target: Path) -> Path:
    """`source` (a central file) rewritten as ml-flair's prepare_dataset.py writes it: groups
    created by path, so they track no creation order."""
    with h5py.File(source) as src, h5py.File(target, "w") as dst:
        for split in (s for s in ("train", "val", "test") if s in src):
            for image_id in src[split]:  # creation order here: raw order
                for name, member in src[split][image_id].items():
                    dst[f"/{split}/{image_id}/{name}"] = member[()]
        for name in src["metadata"]:
            dst[f"/metadata/{name}"] = src["metadata"][name][()]
    return target


def test_max_images_keeps_the_same_images_in_every_layout_flair_fl_writes(
    prepared: dict[Layout, Path],
    expected: dict[str, ExpectedUser],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the user with most images, cut to two
    user_id = user_with_most_images(expected)
    split, cut = expected[user_id].split, 2
    assert len(expected[user_id].images) > cut

    # Execute
    reads = {
        layout: FlairHDF5(path).read_user(split, user_id, max_images=cut)
        for layout, path in prepared.items()
    }

    # Assert: the raw order's first two, in each layout, and no warning
    for layout, user in reads.items():
        np.testing.assert_array_equal(user.images, expected[user_id].images[:cut], err_msg=layout)
    assert not [r for r in caplog.records if "keeps no image order" in r.getMessage()]


def test_an_unordered_central_file_warns_when_max_images_cuts_a_user(
    prepared: dict[Layout, Path],
    expected: dict[str, ExpectedUser],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    path = _mlflair_central_copy(prepared["central"], tmp_path / "mlflair_central.hdf5")
    reader = FlairHDF5(path)
    user_id = user_with_most_images(expected)
    split, n = expected[user_id].split, len(expected[user_id].images)

    # Execute
    whole = reader.read_user(split, user_id)
    quiet = [r for r in caplog.records if "keeps no image order" in r.getMessage()]
    reader.read_user(split, user_id, max_images=n - 1)
    reader.read_user(split, user_id, max_images=n - 1)

    # Assert: no order is tracked (name order), uncut reads are quiet, a cut warns once
    with h5py.File(path) as h5:
        assert list(h5[split]) == sorted(h5[split])
    assert len(whole.images) == n and not quiet
    # ... which is not the raw order here, so the cut keeps other images
    assert not np.array_equal(whole.images[: n - 1], expected[user_id].images[: n - 1])
    warned = [r for r in caplog.records if "keeps no image order" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0].getMessage()
