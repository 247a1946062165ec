"""The three FLAIR HDF5 layouts a `FlairHDF5` reads: where a user's images and labels live.

- `PflLayout`: pfl-research's per-user groups; labels as (row, col) index pairs and
  `label_mapping` metadata.
- `MlFlairLayout`: ml-flair's per-user groups; labels as '|'-joined strings and
  `label_counter` metadata.
- `CentralLayout`: ml-flair's one group per image (`--not_group_data_by_user`), each naming
  its user.

A layout says whether a file is in it (`matches`, on the first group of a split), the label
mappings, the users' sizes, and a user's images, targets and label names. `FlairHDF5`
(hdf5.py) owns the file handle, caching, error wrapping and the public reading API; it picks
the first layout of `LAYOUTS` that matches. A new layout is one class here and its entry in
`LAYOUTS`.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import h5py
import numpy as np

from flair_fl.data.decode import StoredImages
from flair_fl.data.labels import SPLITS, label_mapping
from flair_fl.data.targets import (
    check_label_indices,
    indexed_targets,
    split_labels,
    targets_from_strings,
)
from flair_fl.data.writer import CRC_DATASET
from flair_fl.errors import FlairFormatError

log = logging.getLogger(__name__)
DAMAGED = "the file is truncated or corrupted: delete it and re-create it. "


@dataclass(frozen=True)
class UserData:
    """One user's images (uint8, N x H x W x 3) and multi-hot targets (float32, N x L)."""

    images: np.ndarray
    targets: np.ndarray


@dataclass(frozen=True)
class StoredUser:
    """One user's images as stored (JPEG bytes not decoded yet) and multi-hot targets."""

    images: StoredImages
    targets: np.ndarray

    def decoded(self) -> UserData:
        return UserData(self.images.decoded(), self.targets)


class HDF5File(Protocol):
    """What a layout reads through: the open file and its splits (a FlairHDF5)."""

    path: Path

    @property
    def h5(self) -> h5py.File: ...

    def split_group(self, split: str) -> h5py.Group: ...


class Layout(ABC):
    """Where one layout keeps a user's images and labels."""

    name: ClassVar[str]

    def __init__(self, file: HDF5File):
        self.file = file

    @staticmethod
    @abstractmethod
    def matches(first: h5py.Group) -> bool:
        """Whether `first`, the first group of a split, is in this layout."""

    @abstractmethod
    def mappings(self) -> dict[str, dict[str, int]]:
        """{label set: {label: index}} from the file's metadata."""

    @abstractmethod
    def sizes(self, split: str) -> dict[str, int]:
        """{user_id: number of images} of a split (without a stored index)."""

    @abstractmethod
    def user_size(self, split: str, user_id: str) -> int:
        """How many images the user has (FlairFormatError if there is no such user)."""

    @abstractmethod
    def read(
        self, split: str, user_id: str, index: np.ndarray, mapping: dict[str, int], key: str
    ) -> StoredUser:
        """Images `index` (increasing) of a user and their targets under `mapping`."""

    @abstractmethod
    def labels(
        self, split: str, user_id: str, key: str, names: dict[int, str]
    ) -> list[tuple[str, ...]]:
        """A user's label names per image, in image order, reading no image."""

    @abstractmethod
    def image(self, split: str, user_id: str, index: int) -> np.ndarray:
        """One image (uint8 H x W x 3) of a user, reading no other image."""

    def store(self) -> str:
        """`uint8` (decoded pixels) or `jpeg` (original JPEG bytes, decoded when read)."""
        return "uint8"

    def cuts_unordered(self, split: str) -> bool:
        """Whether cutting a user to its first images depends on an order the file lacks."""
        return False

    def where(self, split: str, user_id: str) -> str:
        return f"{self.file.path}: split '{split}', user {user_id}"


@dataclass(frozen=True)
class OpenUser:
    """A per-user group opened once for one read: its `images` dataset and their count
    (every h5py look-up costs ~15 us, a read of a small user's pixels about as much)."""

    group: h5py.Group
    images: h5py.Dataset
    size: int


class PerUserLayout(Layout):
    """A group per user holding `images` (one row per image) and per-image members."""

    def __init__(self, file: HDF5File):
        super().__init__(file)
        self._checked: set[tuple[str, str]] = set()  # users whose members were checked
        # The last user opened: a read asks for its size, then for its images and labels.
        self._last: tuple[tuple[str, str, int], OpenUser] | None = None

    def sizes(self, split: str) -> dict[str, int]:
        group = self.file.split_group(split)
        return {user: int(group[user]["image_ids"].shape[0]) for user in group}

    def user_size(self, split: str, user_id: str) -> int:
        return self.open_user(split, user_id).size

    def store(self) -> str:
        for split in (s for s in SPLITS if s in self.file.h5):
            for user in self.file.h5[split].values():
                return (
                    "jpeg" if h5py.check_vlen_dtype(user["images"].dtype) is not None else "uint8"
                )
        return "uint8"

    def open_user(self, split: str, user_id: str) -> OpenUser:
        """A user's group and images, its per-image members checked to have one entry per
        image (once per user and reader: a client reads its users again in later rounds).
        The last user opened is kept (per process: a forked reader opens its own)."""
        key = (split, user_id, os.getpid())
        if self._last is not None and self._last[0] == key and self._last[1].group.id.valid:
            return self._last[1]
        try:
            group = self.file.split_group(split)[user_id]
        except KeyError:
            raise FlairFormatError(
                f"{self.file.path}: no user {user_id!r} in split '{split}'"
            ) from None
        images = group["images"]
        user = OpenUser(group, images, int(images.shape[0]))
        if (split, user_id) not in self._checked:
            self._check_members(split, user_id, user)
            self._checked.add((split, user_id))
        self._last = (key, user)
        return user

    def _check_members(self, split: str, user_id: str, user: OpenUser) -> None:
        members = set(user.group)
        for name in ("image_ids", "labels", "fine_grained_labels"):  # the last two: mlflair
            if name in members and (length := user.group[name].shape[0]) != user.size:
                raise FlairFormatError(
                    f"{self.file.path}: split '{split}', user {user_id}: {user.size} images "
                    f"but {length} entries in '{name}' (they must match)"
                )

    def read(
        self, split: str, user_id: str, index: np.ndarray, mapping: dict[str, int], key: str
    ) -> StoredUser:
        user = self.open_user(split, user_id)
        # A contiguous prefix reads as one slice; h5py's point selection is slower.
        contiguous = index.size and index[-1] - index[0] + 1 == index.size
        selection = slice(int(index[0]), int(index[-1]) + 1) if contiguous else index
        images = self.pixels(user, selection, f"/{split}/{user_id}/images", index)
        where = self.where(split, user_id)
        targets = self.targets(user, key, index, selection, mapping, where)
        if len(targets) != len(images):
            raise FlairFormatError(
                f"{where}: {len(images)} images but {len(targets)} label entries"
            )
        return StoredUser(images, targets)

    @abstractmethod
    def targets(
        self,
        user: OpenUser,
        key: str,
        index: np.ndarray,
        selection: slice | np.ndarray,
        mapping: dict[str, int],
        where: str,
    ) -> np.ndarray:
        """Multi-hot targets (float32) of the selected images."""

    def pixels(
        self, user: OpenUser, selection: slice | np.ndarray, name: str, index: np.ndarray
    ) -> StoredImages:
        """uint8 (n, H, W, 3) stored pixels, or the compact store's JPEG bytes (undecoded)."""
        dataset = user.images
        if h5py.check_vlen_dtype(dataset.dtype) is None:
            return StoredImages(pixels=np.asarray(dataset[selection]))
        names = tuple(f"{self.file.path}: {name}[{i}]" for i in index)
        jpegs = list(dataset[selection])
        if CRC_DATASET in user.group:  # prepared with checksums: HDF5 cannot filter vlen rows
            checksums = user.group[CRC_DATASET][selection]
            for stored, jpeg, where in zip(checksums, jpegs, names, strict=True):
                if zlib.crc32(jpeg.tobytes()) != int(stored):
                    raise FlairFormatError(
                        f"{where}: the JPEG bytes fail their CRC-32 checksum; " + DAMAGED
                    )
        return StoredImages(jpegs=jpegs, names=names)

    def image(self, split: str, user_id: str, index: int) -> np.ndarray:
        user = self.open_user(split, user_id)
        n_images = user.size
        if not -n_images <= index < n_images:
            raise IndexError(
                f"{self.file.path}: user {user_id} has {n_images} images, no [{index}]"
            )
        position = np.array([index % n_images])
        stored = self.pixels(user, position, f"/{split}/{user_id}/images", position)
        return stored.decoded()[0]


class PflLayout(PerUserLayout):
    """pfl-research's layout: `<key>_row` / `<key>_col` label index pairs per user."""

    name = "pfl"

    @staticmethod
    def matches(first: h5py.Group) -> bool:
        return "labels_row" in first

    def mappings(self) -> dict[str, dict[str, int]]:
        keys = {"coarse": "label_mapping", "fine": "fine_grained_label_mapping"}
        return {k: json.loads(self.file.h5[f"metadata/{v}"][()]) for k, v in keys.items()}

    def targets(
        self,
        user: OpenUser,
        key: str,
        index: np.ndarray,
        selection: slice | np.ndarray,
        mapping: dict[str, int],
        where: str,
    ) -> np.ndarray:
        return indexed_targets(
            user.group[f"{key}_row"][()],
            user.group[f"{key}_col"][()],
            index,
            user.size,
            len(mapping),
            f"{where}: {key}_row/_col",
        )

    def labels(
        self, split: str, user_id: str, key: str, names: dict[int, str]
    ) -> list[tuple[str, ...]]:
        user = self.open_user(split, user_id)
        rows, cols = user.group[f"{key}_row"][()], user.group[f"{key}_col"][()]
        n_images = user.size
        check_label_indices(
            rows, cols, n_images, len(names), f"{self.where(split, user_id)}: {key}_row/_col"
        )
        per_image: list[list[str]] = [[] for _ in range(n_images)]
        for row, col in zip(rows, cols, strict=True):
            per_image[int(row)].append(names[int(col)])
        return [tuple(labels) for labels in per_image]


def _counter_mappings(h5: h5py.File) -> dict[str, dict[str, int]]:
    """ml-flair's label counters -> {label set: alphabetical mapping}."""
    keys = {"coarse": "label_counter", "fine": "fine_grained_label_counter"}
    return {k: label_mapping(json.loads(h5[f"metadata/{v}"][()])) for k, v in keys.items()}


class MlFlairLayout(PerUserLayout):
    """ml-flair's per-user layout: '|'-joined label strings per image."""

    name = "mlflair"

    @staticmethod
    def matches(first: h5py.Group) -> bool:
        return "images" in first and "labels" in first

    def mappings(self) -> dict[str, dict[str, int]]:
        return _counter_mappings(self.file.h5)

    def targets(
        self,
        user: OpenUser,
        key: str,
        index: np.ndarray,
        selection: slice | np.ndarray,
        mapping: dict[str, int],
        where: str,
    ) -> np.ndarray:
        return targets_from_strings(list(user.group[key][selection]), mapping, where)

    def labels(
        self, split: str, user_id: str, key: str, names: dict[int, str]
    ) -> list[tuple[str, ...]]:
        return [split_labels(joined) for joined in self.open_user(split, user_id).group[key][()]]


class CentralLayout(Layout):
    """ml-flair's `--not_group_data_by_user` layout: a group per image naming its user."""

    name = "central"

    @staticmethod
    def matches(first: h5py.Group) -> bool:
        return "image" in first and "user_id" in first

    def mappings(self) -> dict[str, dict[str, int]]:
        return _counter_mappings(self.file.h5)

    def __init__(self, file: HDF5File):
        super().__init__(file)
        self._index: dict[str, dict[str, list[str]]] = {}

    def user_images(self, split: str) -> dict[str, list[str]]:
        """{user_id: its image group names}, built once per split by reading every image's
        user id."""
        if split not in self._index:
            users: dict[str, list[str]] = {}
            group = self.file.split_group(split)
            for image_id in group:
                user = group[image_id]["user_id"][()].decode()
                users.setdefault(user, []).append(image_id)
            self._index[split] = users
        return self._index[split]

    def ids(self, split: str, user_id: str) -> list[str]:
        ids = self.user_images(split).get(user_id)
        if ids is None:
            raise FlairFormatError(f"{self.file.path}: no user {user_id!r} in split '{split}'")
        return ids

    def sizes(self, split: str) -> dict[str, int]:
        return {u: len(ids) for u, ids in self.user_images(split).items()}

    def user_size(self, split: str, user_id: str) -> int:
        return len(self.ids(split, user_id))

    def read(
        self, split: str, user_id: str, index: np.ndarray, mapping: dict[str, int], key: str
    ) -> StoredUser:
        group = self.file.split_group(split)
        ids = [self.ids(split, user_id)[i] for i in index]
        pixels = np.stack([group[i]["image"][()] for i in ids])
        strings = [group[i][key][()] for i in ids]
        targets = targets_from_strings(strings, mapping, self.where(split, user_id))
        return StoredUser(StoredImages(pixels=pixels), targets)

    def labels(
        self, split: str, user_id: str, key: str, names: dict[int, str]
    ) -> list[tuple[str, ...]]:
        group = self.file.split_group(split)
        return [split_labels(group[i][key][()]) for i in self.ids(split, user_id)]

    def image(self, split: str, user_id: str, index: int) -> np.ndarray:
        group = self.file.split_group(split)
        return np.asarray(group[self.ids(split, user_id)[index]]["image"][()])

    def cuts_unordered(self, split: str) -> bool:
        """ml-flair's central files keep no per-user image order (their groups do not track
        creation order, so they read in name order); flair-fl's do."""
        group = self.file.split_group(split)
        return not group.id.get_create_plist().get_link_creation_order()


LAYOUTS: tuple[type[Layout], ...] = (PflLayout, MlFlairLayout, CentralLayout)


def detect_layout(file: HDF5File, splits: Sequence[str]) -> Layout:
    """The layout of the first group of the first non-empty split."""
    for split in splits:
        if split in file.h5 and len(file.h5[split]) > 0:
            first = file.h5[split][next(iter(file.h5[split]))]
            for layout in LAYOUTS:
                if layout.matches(first):
                    return layout(file)
            raise FlairFormatError(
                f"{file.path}: /{split}/{first.name} has unknown members {list(first)}"
            )
    raise FlairFormatError(f"{file.path}: holds no train/val/test split with users")
