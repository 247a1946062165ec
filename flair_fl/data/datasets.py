"""Torch datasets over a prepared FLAIR HDF5 file: one user's data, or a whole split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from flair_fl.data.augment import IMAGENET_MEAN, IMAGENET_STD, TrainAugment
from flair_fl.data.hdf5 import FlairReader, LabelSet
from flair_fl.data.hdf5_layouts import StoredUser, UserData

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SplitDataset",
    "TrainImages",
    "UserDataset",
    "build_transform",
]
Transform = Callable[[torch.Tensor], torch.Tensor]


def build_transform(
    train: bool,
    size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Transform:
    """FLAIR reference transforms on uint8 CHW tensors.

    Train: RandomResizedCrop(size) + horizontal flip; eval: Resize(size) (FLAIR images are
    square, so this is size x size); both scaled to [0, 1] and normalised.
    """
    geometry: list[torch.nn.Module] = (
        [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        if train
        else [v2.Resize((size, size), antialias=True)]
    )
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def to_chw_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) array -> uint8 (N, 3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


class UserDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """All of one user's (capped) images, held in memory as uint8."""

    def __init__(
        self, data: UserData, transform: Transform | None = None, label_index: int | None = None
    ):
        self.images = to_chw_tensor(data.images)
        targets = torch.from_numpy(data.targets)
        # Binary mode (ml-flair): one label's column is the only target.
        self.targets = targets if label_index is None else targets[:, [label_index]]
        self.transform = transform

    @classmethod
    def from_file(
        cls,
        reader: FlairReader,
        split: str,
        user_id: str,
        label_set: LabelSet,
        transform: Transform | None = None,
        max_images: int | None = None,
        label_index: int | None = None,
    ) -> UserDataset:
        return cls(reader.read_user(split, user_id, label_set, max_images), transform, label_index)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


class TrainImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One user's (capped) training images, moved to the training device once as uint8
    (N, H, W, 3) (the compact store's JPEGs decoded there), augmented a batch at a time.

    Items are (image index, target): a DataLoader (or Opacus's Poisson one) draws the batch
    of indices, and `inputs` turns it into the augmented float batch on the device, each
    image with its own crop and flip from `generator`.
    """

    def __init__(
        self,
        stored: StoredUser,
        augment: TrainAugment,
        generator: torch.Generator,
        device: torch.device,
        label_index: int | None = None,
    ):
        self.images = stored.images.to_device(device)
        targets = torch.from_numpy(stored.targets)
        self.targets = targets if label_index is None else targets[:, [label_index]]
        self.index = torch.arange(len(self.targets))
        self.augment, self.generator = augment, generator

    @classmethod
    def from_file(
        cls,
        reader: FlairReader,
        user_id: str,
        label_set: LabelSet,
        augment: TrainAugment,
        generator: torch.Generator,
        device: torch.device,
        max_images: int | None = None,
        label_index: int | None = None,
    ) -> TrainImages:
        """A user of the train split."""
        stored = reader.read_user_stored("train", user_id, label_set, max_images)
        return cls(stored, augment, generator, device, label_index)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index[index], self.targets[index]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items `index` (int64) at once, collated: per-item fetching and default_collate's
        stacking cost ~30 us per image, a fifth of the augmentation."""
        return index, self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch`, for a DataLoader's fetcher (`collate_batch` passes it through)."""
        return self.batch(torch.tensor(indices, dtype=torch.int64))

    def inputs(
        self, index: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
    ) -> torch.Tensor:
        """The augmented float32 batch (B, 3, size, size) of images `index`, on the device."""
        return self.augment(self.images, self.generator, memory_format, rows=index)


def collate_batch(batch: Any) -> Any:
    """The DataLoader's collate_fn for a dataset whose `__getitems__` returns the collated
    batch (TrainImages): nothing left to do."""
    return batch


class SplitDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Every image of a split, indexed user by user; for central evaluation and training.

    Reads one user's block at a time and keeps the last one, so sequential access (as a
    DataLoader without shuffling does) reads each user once.
    """

    def __init__(
        self,
        reader: FlairReader,
        split: str,
        label_set: LabelSet = "coarse",
        transform: Transform | None = None,
        max_images_per_user: int | None = None,
        label_index: int | None = None,
    ):
        self.reader, self.split, self.label_set = reader, split, label_set
        self.label_index = label_index
        self.transform = transform
        population = reader.population(split)
        self.users = list(population)
        sizes = np.array(
            [
                population[u]
                if max_images_per_user is None
                else min(population[u], max_images_per_user)
                for u in self.users
            ]
        )
        self.max_images_per_user = max_images_per_user
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._cached: tuple[int, UserDataset] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        user = int(np.searchsorted(self.offsets, index, side="right") - 1)
        if self._cached is None or self._cached[0] != user:
            data = self.reader.read_user(
                self.split, self.users[user], self.label_set, self.max_images_per_user
            )
            self._cached = (user, UserDataset(data, self.transform, self.label_index))
        return self._cached[1][index - int(self.offsets[user])]
