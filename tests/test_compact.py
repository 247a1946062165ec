"""The compact store (original JPEG bytes) reads exactly like the uint8 store."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from flair_fl.data.datasets import UserDataset, build_transform
from flair_fl.data.decode import decode_image, decode_stored_jpegs
from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.prepare import Layout, prepare_flair
from flair_fl.data.raw import IMAGE_DIR
from flair_fl.errors import FlairFormatError
from tests.h5_contents import hdf5_contents

REPO = Path(__file__).resolve().parents[1]


def jpeg(mode: str, **options: object) -> bytes:
    """A noisy 48 x 40 image (odd-sized chroma blocks), encoded with PIL."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("RGB", {"quality": 90}),  # 4:2:0, PIL's default
        ("RGB", {"quality": 75, "subsampling": 1}),  # 4:2:2
        ("RGB", {"quality": 95, "subsampling": 0}),  # 4:4:4
        ("RGB", {"quality": 80, "progressive": True}),
        ("RGB", {"quality": 50, "optimize": True}),
        ("L", {"quality": 90}),  # greyscale
        ("CMYK", {"quality": 90}),
    ],
)
def test_pil_and_torchvision_decode_identically(mode: str, options: dict[str, object]) -> None:
    # Prepare
    data = jpeg(mode, **options)

    # Execute
    by_pil = decode_image(data, "test image")
    by_torchvision = decode_stored_jpegs([np.frombuffer(data, np.uint8)], lambda i: "test")[0]

    # Assert: exactly, not within a tolerance
    np.testing.assert_array_equal(by_torchvision, by_pil)


@pytest.fixture(scope="module")
def stores(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("stores")
    return {
        f"{layout}-{store}": prepare_flair(
            tiny_raw, out / f"{layout}-{store}.h5", layout, progress=False, store=store
        )
        for layout in ("pfl", "mlflair")
        for store in ("uint8", "jpeg")
    }


@pytest.mark.parametrize("layout", ["pfl", "mlflair"])
def test_jpeg_store_reads_the_same_arrays(layout: Layout, stores: dict[str, Path]) -> None:
    # Prepare
    pixels, compact = FlairHDF5(stores[f"{layout}-uint8"]), FlairHDF5(stores[f"{layout}-jpeg"])

    for split in ("train", "val", "test"):
        for user, count in compact.population(split).items():
            # Execute
            got = compact.read_user(split, user, "fine")
            want = pixels.read_user(split, user, "fine")

            # Assert
            np.testing.assert_array_equal(got.images, want.images)
            np.testing.assert_array_equal(got.targets, want.targets)
            np.testing.assert_array_equal(
                compact.read_image(split, user, count - 1), pixels.read_image(split, user, -1)
            )
    assert (compact.store, pixels.store) == ("jpeg", "uint8")


def test_jpeg_store_gives_the_same_training_tensors(stores: dict[str, Path]) -> None:
    # Prepare: the user with most images, with the train transform (random crop and flip)
    pixels, compact = FlairHDF5(stores["pfl-uint8"]), FlairHDF5(stores["pfl-jpeg"])
    user = max(pixels.population("train").items(), key=lambda item: item[1])[0]
    transform = build_transform(train=True, size=24)
    batches = []

    for reader in (pixels, compact):
        # Execute
        dataset = UserDataset.from_file(reader, "train", user, "coarse", transform, 64)
        torch.manual_seed(5)
        batches.append([dataset[i] for i in range(len(dataset))])

    # Assert
    for (image_a, target_a), (image_b, target_b) in zip(*batches, strict=True):
        assert torch.equal(image_a, image_b) and torch.equal(target_a, target_b)


def test_jpeg_store_holds_the_original_files(tiny_raw: Path, stores: dict[str, Path]) -> None:
    # Prepare
    reader = FlairHDF5(stores["pfl-jpeg"])
    user, _ = next(iter(reader.population("train").items()))

    # Execute
    with h5py.File(stores["pfl-jpeg"], "r") as h5:
        stored = [bytes(b) for b in h5[f"train/{user}/images"][()]]
        ids = [i.decode() for i in h5[f"train/{user}/image_ids"][()]]

    # Assert
    assert stored == [(tiny_raw / IMAGE_DIR / f"{i}.jpg").read_bytes() for i in ids]


def test_selected_images_of_a_user(stores: dict[str, Path]) -> None:
    # Prepare
    readers = [FlairHDF5(stores["pfl-uint8"]), FlairHDF5(stores["pfl-jpeg"])]
    user = max(readers[0].population("train").items(), key=lambda item: item[1])[0]
    full = readers[0].read_user("train", user, "fine")

    for reader in readers:
        # Execute
        some = reader.read_images("train", user, [0, 3, 4, 10], "fine")

        # Assert
        np.testing.assert_array_equal(some.images, full.images[[0, 3, 4, 10]])
        np.testing.assert_array_equal(some.targets, full.targets[[0, 3, 4, 10]])
        with pytest.raises(ValueError, match="increasing"):
            reader.read_images("train", user, [4, 3], "fine")


def test_damaged_stored_jpeg_is_named(stores: dict[str, Path], tmp_path: Path) -> None:
    # Prepare: truncate the third stored JPEG of a user
    path = tmp_path / "damaged.h5"
    path.write_bytes(stores["pfl-jpeg"].read_bytes())
    population = FlairHDF5(stores["pfl-jpeg"]).population("train")
    user = max(population.items(), key=lambda item: item[1])[0]
    with h5py.File(path, "a") as h5:
        images = h5[f"train/{user}/images"]
        images[2] = images[2][:50]

    # Execute
    with pytest.raises(FlairFormatError) as err:
        FlairHDF5(path).read_user("train", user)

    # Assert
    assert f"{path}: /train/{user}/images[2]: stored JPEG bytes do not decode" in str(err.value)


def test_central_layout_has_no_jpeg_store(tiny_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per-user layout"):
        prepare_flair(tiny_raw, tmp_path / "c.h5", "central", progress=False, store="jpeg")
    assert list(tmp_path.iterdir()) == []


def test_parallel_decoding_writes_the_same_file(
    tiny_raw: Path, tiny_hdf5: Path, stores: dict[str, Path], tmp_path: Path
) -> None:
    # Execute: both stores, decoded in 2 threads
    pixels = prepare_flair(tiny_raw, tmp_path / "p.h5", progress=False, workers=2)
    compact = prepare_flair(tiny_raw, tmp_path / "j.h5", progress=False, store="jpeg", workers=2)

    # Assert
    assert hdf5_contents(pixels) == hdf5_contents(tiny_hdf5)
    assert hdf5_contents(compact) == hdf5_contents(stores["pfl-jpeg"])


def test_parallel_decoding_reports_a_damaged_image(tiny_raw: Path, tmp_path: Path) -> None:
    # Prepare
    raw = tmp_path / "raw"
    raw.mkdir()
    for item in tiny_raw.iterdir():
        (raw / item.name).symlink_to(item)
    (raw / IMAGE_DIR).unlink()
    (raw / IMAGE_DIR).mkdir()
    images = sorted((tiny_raw / IMAGE_DIR).iterdir())
    for image in images:
        (raw / IMAGE_DIR / image.name).symlink_to(image)
    victim = raw / IMAGE_DIR / images[len(images) // 2].name
    victim.unlink()
    victim.write_bytes(b"\xff\xd8 not a jpeg")

    # Execute
    with pytest.raises(FlairFormatError, match=victim.stem):
        prepare_flair(raw, tmp_path / "out.h5", progress=False, workers=2)

    # Assert
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.partial").exists()


def test_prepare_cli_writes_the_compact_store(tiny_raw: Path, tmp_path: Path) -> None:
    # Execute
    done = subprocess.run(
        [sys.executable, "scripts/prepare_flair.py", "--dataset-dir", str(tiny_raw),
         "--output", str(tmp_path / "c.h5"), "--store", "jpeg", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    # Assert
    assert done.returncode == 0, done.stderr
    assert "jpeg store" in done.stdout and "images/s" in done.stdout
    assert FlairHDF5(tmp_path / "c.h5").store == "jpeg"


def _train_user(reader: FlairHDF5, user: str, device: torch.device) -> dict[str, object]:
    """One client's local training (the client's own data path) from `reader`."""
    from flair_fl.data.augment import TrainAugment
    from flair_fl.data.datasets import TrainImages
    from flair_fl.learning.local_training import LocalTraining, train_local
    from flair_fl.models.small_cnn import small_cnn

    data = TrainImages.from_file(
        reader, user, "coarse", TrainAugment(24), torch.Generator().manual_seed(2), device, 64
    )
    torch.manual_seed(0)
    model = small_cnn(17, width=4)
    settings = LocalTraining(epochs=2, batch_size=4, lr=0.1)
    stats = train_local(
        model, data, settings, device, torch.Generator().manual_seed(1), inputs=data.inputs
    )
    return {"stats": stats, "weights": [p.detach().cpu() for p in model.parameters()]}


def test_jpeg_store_gives_the_same_training(stores: dict[str, Path]) -> None:
    # Prepare: the user with most images, on both stores
    pixels, compact = FlairHDF5(stores["pfl-uint8"]), FlairHDF5(stores["pfl-jpeg"])
    user = max(pixels.population("train").items(), key=lambda item: item[1])[0]

    # Execute: the compact store's JPEGs are decoded by the batched path, on the CPU
    runs = [_train_user(reader, user, torch.device("cpu")) for reader in (pixels, compact)]

    # Assert: libjpeg-turbo decodes what preparation stored, so training is identical
    assert runs[0]["stats"] == runs[1]["stats"]
    for a, b in zip(runs[0]["weights"], runs[1]["weights"], strict=True):  # type: ignore[call-overload]
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_decode_is_close_to_libjpeg(stores: dict[str, Path]) -> None:
    # Prepare
    from flair_fl.data.decode import decode_jpegs

    with h5py.File(stores["pfl-jpeg"], "r") as h5:
        user = next(iter(h5["train"]))
        encoded = list(h5[f"train/{user}/images"][()])

    # Execute
    cpu = decode_jpegs(encoded, str, torch.device("cpu"))
    cuda = decode_jpegs(encoded, str, torch.device("cuda")).cpu()

    # Assert: nvJPEG is not bit-exact with libjpeg-turbo, but close (upsampling, IDCT)
    assert cuda.shape == cpu.shape and cuda.dtype == torch.uint8
    difference = (cuda.int() - cpu.int()).abs()
    assert difference.float().mean() < 1.0 and difference.max() <= 16
