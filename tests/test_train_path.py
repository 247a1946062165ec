"""The client's training data path: a user's images on the device once, augmented per batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flair_fl.data.augment import TrainAugment
from flair_fl.data.datasets import TrainImages
from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.learning.local_training import (
    LocalTraining,
    batch_loader,
    epoch_batches,
    train_local,
)
from flair_fl.models.small_cnn import small_cnn

CPU = torch.device("cpu")
SETTINGS = LocalTraining(epochs=2, batch_size=4, lr=0.1, proximal_mu=0.1)


def biggest_user(path: Path) -> tuple[FlairHDF5, str]:
    reader = FlairHDF5(path)
    return reader, max(reader.population("train").items(), key=lambda item: item[1])[0]


def user_images(path: Path, augment_seed: int, device: torch.device = CPU) -> TrainImages:
    reader, user = biggest_user(path)
    generator = torch.Generator().manual_seed(augment_seed)
    augment = TrainAugment(24)
    return TrainImages.from_file(reader, user, "coarse", augment, generator, device, 20)


def train(data: TrainImages, dp: bool = False, device: torch.device = CPU) -> tuple[dict, list]:
    torch.manual_seed(0)
    model = small_cnn(17, width=4)
    order = torch.Generator().manual_seed(1)
    if dp:
        # imported here: opacus needs scipy, which the GPU check's bundle leaves out
        from flair_fl.privacy.dp_sgd import train_local_dp_sgd

        dp_settings = {"noise_multiplier": 0.5, "max_grad_norm": 1.0}
        stats = train_local_dp_sgd(
            model, data, SETTINGS, device, order, dp_settings, inputs=data.inputs
        )
    else:
        stats = train_local(model, data, SETTINGS, device, order, inputs=data.inputs)
    return stats, [p.detach().cpu().clone() for p in model.parameters()]


@pytest.mark.parametrize("dp", [False, True], ids=["sgd-fedprox", "dp-sgd"])
def test_same_seed_same_training_other_seed_other_augmentation(tiny_hdf5: Path, dp: bool) -> None:
    # Execute
    first = train(user_images(tiny_hdf5, 5), dp)
    again = train(user_images(tiny_hdf5, 5), dp)
    other = train(user_images(tiny_hdf5, 6), dp)

    # Assert: bit-identical with the same seeds; another augmentation seed trains otherwise
    assert first[0] == again[0]
    assert all(torch.equal(a, b) for a, b in zip(first[1], again[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first[1], other[1], strict=True))
    assert first[0]["num_examples"] == len(user_images(tiny_hdf5, 5))


def test_batches_augment_the_users_images_in_place(tiny_hdf5: Path) -> None:
    # Prepare: the user's images as one uint8 NHWC tensor, as read
    data = user_images(tiny_hdf5, 3)
    reader, user = biggest_user(tiny_hdf5)
    stored = torch.from_numpy(reader.read_user("train", user, max_images=20).images)
    rows = torch.tensor([4, 0, 2])

    # Execute
    batch = data.inputs(rows)
    direct = TrainAugment(24)(stored[rows], torch.Generator().manual_seed(3))

    # Assert: augmenting rows of the resident tensor = augmenting a copy of those images
    assert torch.equal(data.images, stored) and data.images.dtype == torch.uint8
    assert torch.equal(batch, direct)
    assert data[2][0] == 2 and torch.equal(data[2][1], data.targets[2])


@pytest.mark.parametrize("size", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("batch_size", [1, 16])
def test_epoch_batches_are_the_data_loaders(tiny_hdf5: Path, size: int, batch_size: int) -> None:
    # Prepare: a TrainImages (whole batches) and a TensorDataset (item by item) of `size`
    data = user_images(tiny_hdf5, 0)
    data.targets = torch.rand(size, 3, generator=torch.Generator().manual_seed(size))
    data.index = torch.arange(size)
    tensors = TensorDataset(torch.arange(size), data.targets)
    ours, torchs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    loader = DataLoader(tensors, batch_size=batch_size, shuffle=True, generator=torchs)

    for _ in range(3):  # epochs
        # Execute
        mine = list(epoch_batches(data, batch_size, ours))
        item_by_item = list(epoch_batches(tensors, batch_size, torch.Generator()))
        theirs = list(loader)

        # Assert: the same batches, in the same order, and the generator left where
        # PyTorch leaves it (so every later epoch and draw is the same too)
        assert len(mine) == len(theirs) == len(item_by_item)
        for (index, targets), (their_index, their_targets) in zip(mine, theirs, strict=True):
            assert torch.equal(index, their_index) and torch.equal(targets, their_targets)
        assert all(len(b[0]) == len(m[0]) for b, m in zip(item_by_item, mine, strict=True))
        assert torch.equal(ours.get_state(), torchs.get_state())


def test_dp_sgd_takes_whole_batches_and_empty_poisson_batches(tiny_hdf5: Path) -> None:
    # Prepare: a small user and a sample rate that draws empty Poisson batches often
    data = user_images(tiny_hdf5, 0)
    from opacus.data_loader import DPDataLoader  # opacus needs scipy (see `train`)

    loader = DPDataLoader.from_data_loader(
        batch_loader(data, 1, torch.Generator().manual_seed(0)),
        generator=torch.Generator().manual_seed(0),
    )

    # Execute
    batches = [batch for _ in range(20) for batch in loader]

    # Assert: every batch is (indices, targets) of one length, empty ones included
    sizes = [len(index) for index, _ in batches]
    assert 0 in sizes and max(sizes) > 0
    for index, targets in batches:
        assert index.dtype == torch.int64 and targets.shape == (len(index), data.targets.shape[1])
        assert torch.equal(targets, data.targets[index])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_path_trains_the_same_users(tiny_hdf5: Path) -> None:
    # Prepare
    cuda = torch.device("cuda")

    # Execute
    data = user_images(tiny_hdf5, 5, cuda)
    stats, weights = train(data, device=cuda)
    cpu_stats, _ = train(user_images(tiny_hdf5, 5))

    # Assert: the images live on the GPU; same steps and examples as on the CPU
    assert data.images.device.type == "cuda"
    assert stats["num_steps"] == cpu_stats["num_steps"]
    assert all(torch.isfinite(w).all() for w in weights)
