"""IID pseudo-users over a prepared FLAIR file (pfl-research's `flair_iid`), for IID vs
natural (non-IID) comparisons.

The train images of all users are shuffled (seeded) and cut into pseudo-users of
`user_size` images: every train image belongs to exactly one pseudo-user, and the last one
holds the remainder when `user_size` does not divide the number of images. val and test keep
their natural users (central evaluation pools every image of a split anyway).
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np

from flair_fl.data.decode import StoredImages
from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.hdf5_layouts import StoredUser, UserData
from flair_fl.data.targets import LabelSet
from flair_fl.errors import FlairFormatError

IID_PREFIX = "iid-"


class IidPartition:
    """A FlairReader whose `split` users are IID pseudo-users; other splits pass through."""

    def __init__(self, base: FlairHDF5, user_size: int, seed: int, split: str = "train"):
        if user_size < 1:
            raise ValueError(f"iid_user_size must be >= 1, got {user_size}")
        self.base, self.user_size, self.seed, self.split = base, user_size, seed, split

    def __getstate__(self) -> dict[str, object]:
        return {k: self.__dict__[k] for k in ("base", "user_size", "seed", "split")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)

    @cached_property
    def _assignment(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(natural users, owner and image index of each shuffled train image)."""
        population = self.base.population(self.split)
        users = sorted(population)  # independent of the file's group order
        counts = [population[u] for u in users]
        owner = np.repeat(np.arange(len(users)), counts)
        index = np.concatenate([np.arange(n) for n in counts]) if users else np.zeros(0, int)
        order = np.random.default_rng(self.seed).permutation(len(owner))
        return users, owner[order], index[order]

    @cached_property
    def _names(self) -> list[str]:
        total = len(self._assignment[1])
        count = math.ceil(total / self.user_size)
        width = max(6, len(str(count)))
        return [f"{IID_PREFIX}{k:0{width}d}" for k in range(count)]

    def members(self, user_id: str) -> list[tuple[str, int]]:
        """(natural user, image index) of each image of a pseudo-user, in its order."""
        users, owner, index = self._assignment
        part = self._position(user_id)
        span = slice(part * self.user_size, (part + 1) * self.user_size)
        return [(users[o], int(i)) for o, i in zip(owner[span], index[span], strict=True)]

    def _position(self, user_id: str) -> int:
        names = self._names
        try:
            part = int(user_id.removeprefix(IID_PREFIX))
        except ValueError:
            part = -1
        if not user_id.startswith(IID_PREFIX) or not 0 <= part < len(names):
            raise FlairFormatError(
                f"{self.base.path}: {user_id!r} is not one of the {len(names)} IID pseudo-users "
                f"of '{self.split}' (data.partition=iid; e.g. {names[0] if names else 'none'})"
            )
        return part

    def splits(self) -> list[str]:
        return self.base.splits()

    def label_mapping(self, label_set: LabelSet = "coarse") -> dict[str, int]:
        return self.base.label_mapping(label_set)

    def num_labels(self, label_set: LabelSet = "coarse") -> int:
        return self.base.num_labels(label_set)

    def population(self, split: str) -> dict[str, int]:
        """{user_id: number of images}; pseudo-users for the partitioned split."""
        if split != self.split:
            return self.base.population(split)
        total = len(self._assignment[1])
        return {
            name: min(self.user_size, total - k * self.user_size)
            for k, name in enumerate(self._names)
        }

    def read_user(
        self,
        split: str,
        user_id: str,
        label_set: LabelSet = "coarse",
        max_images: int | None = None,
    ) -> UserData:
        """A (pseudo-)user's first `max_images` images and their multi-hot targets."""
        return self.read_user_stored(split, user_id, label_set, max_images).decoded()

    def read_user_stored(
        self,
        split: str,
        user_id: str,
        label_set: LabelSet = "coarse",
        max_images: int | None = None,
    ) -> StoredUser:
        """`read_user` without decoding the compact store's JPEGs."""
        if split != self.split:
            return self.base.read_user_stored(split, user_id, label_set, max_images)
        members = self.members(user_id)[:max_images]
        owners = np.array([user for user, _ in members])
        indices = np.array([index for _, index in members])
        parts, targets, slots_read = [], [], []
        for user in dict.fromkeys(owners.tolist()):  # each natural user read once
            slots = np.flatnonzero(owners == user)
            slots = slots[np.argsort(indices[slots])]  # h5py reads increasing indices
            data = self.base.read_images_stored(split, user, indices[slots].tolist(), label_set)
            parts.append(data.images)
            targets.append(data.targets)
            slots_read.append(slots)
        # Read in (natural user, index) order; put back in the pseudo-user's order.
        where = np.argsort(np.concatenate(slots_read))
        images = StoredImages.concat(parts).take(where.tolist())
        return StoredUser(images, np.concatenate(targets)[where])
