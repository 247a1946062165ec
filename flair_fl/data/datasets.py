"""Torch datasets over a prepared FLAIR HDF5 file: one user's data, or a whole split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from flair_fl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from flair_fl.data.hdf5 import FlairReader, LabelSet, UserData

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SplitDataset", "UserDataset", "build_transform"]
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
