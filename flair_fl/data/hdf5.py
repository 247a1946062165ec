"""Read prepared FLAIR HDF5 files in any of the three layouts, detected automatically.

- `pfl`: pfl-research's per-user layout (row/col label indices, label_mapping metadata);
- `mlflair`: ml-flair's per-user layout ('|'-joined label strings, label_counter metadata);
- `central`: ml-flair's one-group-per-image layout (`--not_group_data_by_user`).

Each per-user layout comes in two stores, also detected automatically: `uint8` (decoded
pixels) and the compact `jpeg` store (the original JPEG bytes of each image as a
variable-length uint8 array, decoded here with torchvision; identical pixels, see
flair_fl.data.decode).

File handles are opened lazily and cached per process, so a reader can be pickled into Ray
actors and DataLoader workers.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from flair_fl.data.decode import StoredImages
from flair_fl.data.labels import SPLITS, label_mapping
from flair_fl.data.targets import (
    LabelSet,
    check_label_indices,
    indexed_targets,
    label_key,
    split_labels,
    targets_from_strings,
)
from flair_fl.data.writer import CRC_DATASET, NUM_IMAGES_INDEX
from flair_fl.errors import FlairFormatError

log = logging.getLogger(__name__)
_HANDLES: dict[tuple[str, int], h5py.File] = {}

DAMAGED = "the file is truncated or corrupted: delete it and re-create it. "
HOW_TO_PREPARE = (
    "Create it with `python scripts/prepare_flair.py --dataset-dir DIR --output {path}` from a "
    "raw FLAIR directory (real data: `python scripts/download_flair.py --dataset-dir DIR`; "
    "synthetic: `python scripts/make_synthetic.py --out DIR`)."
)


def open_hdf5(path: str | Path) -> h5py.File:
    """A read-only handle for this process (cached; reopened after fork)."""
    key = (str(path), os.getpid())
    handle = _HANDLES.get(key)
    if handle is None or not handle.id.valid:
        if not Path(path).is_file():
            raise FlairFormatError(
                f"{path}: no prepared FLAIR HDF5 file. " + HOW_TO_PREPARE.format(path=path)
            )
        try:
            handle = h5py.File(path, "r")
        except OSError as err:
            raise FlairFormatError(
                f"{path}: not a readable HDF5 file ({err}); "
                + DAMAGED
                + HOW_TO_PREPARE.format(path=path)
            ) from err
        _HANDLES[key] = handle
    return handle


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


class FlairReader(Protocol):
    """What training and evaluation read: a FlairHDF5, or a re-partition of one."""

    def splits(self) -> list[str]: ...

    def population(self, split: str) -> dict[str, int]: ...

    def read_user(
        self,
        split: str,
        user_id: str,
        label_set: LabelSet = "coarse",
        max_images: int | None = None,
    ) -> UserData: ...

    def read_user_stored(
        self,
        split: str,
        user_id: str,
        label_set: LabelSet = "coarse",
        max_images: int | None = None,
    ) -> StoredUser: ...

    def label_mapping(self, label_set: LabelSet = "coarse") -> dict[str, int]: ...

    def num_labels(self, label_set: LabelSet = "coarse") -> int: ...


class FlairHDF5:
    """A prepared FLAIR file. Cheap to construct and to pickle; opens the file on use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        open_hdf5(self.path)  # fail early with a clear message

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.path = Path(str(state["path"]))

    @property
    def h5(self) -> h5py.File:
        return open_hdf5(self.path)

    @cached_property
    def layout(self) -> str:
        for split in SPLITS:
            if split in self.h5 and len(self.h5[split]) > 0:
                first = self.h5[split][next(iter(self.h5[split]))]
                if "labels_row" in first:
                    return "pfl"
                if "images" in first and "labels" in first:
                    return "mlflair"
                if "image" in first and "user_id" in first:
                    return "central"
                raise FlairFormatError(
                    f"{self.path}: /{split}/{first.name} has unknown members {list(first)}"
                )
        raise FlairFormatError(f"{self.path}: holds no train/val/test split with users")

    @cached_property
    def store(self) -> str:
        """`uint8` (decoded pixels) or `jpeg` (original JPEG bytes, decoded when read)."""
        if self.layout != "central":
            for split in self.splits():
                for user in self.h5[split].values():
                    if h5py.check_vlen_dtype(user["images"].dtype) is not None:
                        return "jpeg"
                    return "uint8"
        return "uint8"

    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.h5]

    def _require_split(self, split: str) -> h5py.Group:
        if split not in self.h5:
            raise FlairFormatError(
                f"{self.path}: has no '{split}' split "
                f"(it has: {', '.join(self.splits()) or 'none'})"
            )
        return self.h5[split]

    @cached_property
    def _counters(self) -> dict[str, dict[str, int]]:
        out = {}
        for label_set, key in (("coarse", "label_counter"), ("fine", "fine_grained_label_counter")):
            out[label_set] = json.loads(self.h5[f"metadata/{key}"][()])
        return out

    def label_mapping(self, label_set: LabelSet = "coarse") -> dict[str, int]:
        """{label: index}, alphabetical (the index order every FLAIR reference uses).

        Parsed once per reader: clients ask for it with every user they read.
        """
        return self._mappings[label_set]

    @cached_property
    def _mappings(self) -> dict[str, dict[str, int]]:
        if self.layout == "pfl":
            keys = {"coarse": "label_mapping", "fine": "fine_grained_label_mapping"}
            return {k: json.loads(self.h5[f"metadata/{v}"][()]) for k, v in keys.items()}
        return {k: label_mapping(self._counters[k]) for k in ("coarse", "fine")}

    def num_labels(self, label_set: LabelSet = "coarse") -> int:
        return len(self.label_mapping(label_set))

    def population(self, split: str) -> dict[str, int]:
        """{user_id: number of images} for a split, without reading any image.

        Users with no images are left out, with one warning per split and reader.
        """
        with self._reading(f"the index of split '{split}'"):
            sizes = self._sizes(split)
        empty = [user for user, n in sizes.items() if n == 0]
        warned: set[str] = self.__dict__.setdefault("_warned_empty", set())
        if empty and split not in warned:
            warned.add(split)
            log.warning(
                "%s: %d user(s) of split '%s' have no images and are left out (e.g. %s)",
                self.path,
                len(empty),
                split,
                empty[0],
            )
        return {user: n for user, n in sizes.items() if n > 0} if empty else sizes

    def _sizes(self, split: str) -> dict[str, int]:
        group = self._require_split(split)
        if NUM_IMAGES_INDEX in self.h5:  # parsed once per reader (every evaluation asks)
            return self._num_images_index[split]
        if self.layout == "central":
            return {u: len(ids) for u, ids in self._central_index(split).items()}
        return {user: int(group[user]["image_ids"].shape[0]) for user in group}

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn h5py's errors on a damaged file (OSError; KeyError for an object header
        that does not parse) into a FlairFormatError naming the file and the fix."""
        try:
            yield
        except (OSError, KeyError) as err:
            checksum = "filter returned failure" in str(err)
            raise FlairFormatError(
                f"{self.path}: {what} cannot be read ({err}"
                + ("; a fletcher32 checksum does not match" if checksum else "")
                + "); "
                + DAMAGED
                + HOW_TO_PREPARE.format(path=self.path)
            ) from err

    @cached_property
    def _num_images_index(self) -> dict[str, dict[str, int]]:
        index: dict[str, dict[str, int]] = json.loads(self.h5[NUM_IMAGES_INDEX][()])
        return index

    def _central_index(self, split: str) -> dict[str, list[str]]:
        cache = self.__dict__.setdefault("_central_cache", {})
        if split not in cache:
            users: dict[str, list[str]] = {}
            group = self._require_split(split)
            for image_id in group:
                user = group[image_id]["user_id"][()].decode()
                users.setdefault(user, []).append(image_id)
            cache[split] = users
        return cache[split]

    def read_user(
        self,
        split: str,
        user_id: str,
        label_set: LabelSet = "coarse",
        max_images: int | None = None,
    ) -> UserData:
        """A user's first `max_images` images and their multi-hot targets."""
        return self.read_user_stored(split, user_id, label_set, max_images).decoded()

    def read_user_stored(
        self,
        split: str,
        user_id: str,
        label_set: LabelSet = "coarse",
        max_images: int | None = None,
    ) -> StoredUser:
        """`read_user` without decoding the compact store's JPEGs (the client decodes them
        on its device)."""
        with self._reading(f"user {user_id} of split '{split}'"):
            n_total = self._user_size(split, user_id)
            n = n_total if max_images is None else min(max_images, n_total)
            if n < n_total and self.layout == "central":
                self._warn_unordered(split)
            if n == 0:
                raise FlairFormatError(
                    f"{self.path}: user {user_id} of split '{split}' has no images"
                )
            return self._read(split, user_id, np.arange(n), label_set)

    def read_images(
        self, split: str, user_id: str, indices: Sequence[int], label_set: LabelSet = "coarse"
    ) -> UserData:
        """Some images of a user (indices increasing and distinct), reading no other image."""
        return self.read_images_stored(split, user_id, indices, label_set).decoded()

    def read_images_stored(
        self, split: str, user_id: str, indices: Sequence[int], label_set: LabelSet = "coarse"
    ) -> StoredUser:
        """`read_images` without decoding the compact store's JPEGs."""
        index = np.asarray(indices, dtype=np.int64)
        with self._reading(f"user {user_id} of split '{split}'"):
            n_total = self._user_size(split, user_id)
            if (
                index.size == 0
                or index[0] < 0
                or index[-1] >= n_total
                or np.any(np.diff(index) <= 0)
            ):
                raise ValueError(
                    f"{self.path}: user {user_id}: indices must be increasing, distinct and "
                    f"in [0, {n_total}), got {index.tolist()[:10]}"
                )
            return self._read(split, user_id, index, label_set)

    def _user_size(self, split: str, user_id: str) -> int:
        if self.layout == "central":
            return len(self._central_ids(split, user_id))
        return int(self._user_group(split, user_id)["images"].shape[0])

    def _user_group(self, split: str, user_id: str) -> h5py.Group:
        """A per-user group whose per-image members all have one length per image."""
        group = self._require_split(split)
        if user_id not in group:
            raise FlairFormatError(f"{self.path}: no user {user_id!r} in split '{split}'")
        user = group[user_id]
        n_images = int(user["images"].shape[0])
        per_image = ("image_ids", "labels", "fine_grained_labels")  # the last two: mlflair
        for name in (m for m in per_image if m in user):
            if user[name].shape[0] != n_images:
                raise FlairFormatError(
                    f"{self.path}: split '{split}', user {user_id}: {n_images} images but "
                    f"{user[name].shape[0]} entries in '{name}' (they must match)"
                )
        return user

    def _warn_unordered(self, split: str) -> None:
        """ml-flair's central layout keeps no per-user image order (its groups do not track
        creation order, so they read in name order); flair-fl's does. Say so once when
        `max_images` cuts a user, as that order decides which images are kept."""
        group = self._require_split(split)
        warned = self.__dict__.setdefault("_warned_unordered", set())
        if group.id.get_create_plist().get_link_creation_order() or split in warned:
            return
        warned.add(split)
        log.warning(
            "%s: a central-layout file that keeps no image order (ml-flair's "
            "--not_group_data_by_user): a user's images are read in image-id order, so "
            "client.max_images keeps other images than the per-user layouts and the FLAIR "
            "references (file order) do. For the references' images, prepare a file from the "
            "raw download with scripts/prepare_flair.py",
            self.path,
        )

    def _central_ids(self, split: str, user_id: str) -> list[str]:
        ids = self._central_index(split).get(user_id)
        if ids is None:
            raise FlairFormatError(f"{self.path}: no user {user_id!r} in split '{split}'")
        return ids

    def _read(self, split: str, user_id: str, index: np.ndarray, label_set: LabelSet) -> StoredUser:
        """Images `index` (increasing) of a user, with their targets."""
        mapping = self.label_mapping(label_set)
        where = f"{self.path}: split '{split}', user {user_id}"
        if self.layout == "central":
            group = self._require_split(split)
            ids = [self._central_ids(split, user_id)[i] for i in index]
            pixels = np.stack([group[i]["image"][()] for i in ids])
            strings = [group[i][label_key(label_set)][()] for i in ids]
            targets = targets_from_strings(strings, mapping, where)
            return StoredUser(StoredImages(pixels=pixels), targets)
        user = self._user_group(split, user_id)
        # A contiguous prefix reads as one slice; h5py's point selection is slower.
        contiguous = index.size and index[-1] - index[0] + 1 == index.size
        selection = slice(int(index[0]), int(index[-1]) + 1) if contiguous else index
        images = self._pixels(user, selection, f"/{split}/{user_id}/images", index)
        if self.layout == "pfl":
            key = label_key(label_set)
            targets = indexed_targets(
                user[f"{key}_row"][()],
                user[f"{key}_col"][()],
                index,
                int(user["images"].shape[0]),
                len(mapping),
                f"{where}: {key}_row/_col",
            )
        else:
            strings = list(user[label_key(label_set)][selection])
            targets = targets_from_strings(strings, mapping, where)
        if len(targets) != len(images):
            raise FlairFormatError(
                f"{where}: {len(images)} images but {len(targets)} label entries"
            )
        return StoredUser(images, targets)

    def _pixels(
        self, user: h5py.Group, selection: slice | np.ndarray, name: str, index: np.ndarray
    ) -> StoredImages:
        """uint8 (n, H, W, 3) stored pixels, or the compact store's JPEG bytes (undecoded)."""
        dataset = user["images"]
        if h5py.check_vlen_dtype(dataset.dtype) is None:
            return StoredImages(pixels=np.asarray(dataset[selection]))
        names = tuple(f"{self.path}: {name}[{i}]" for i in index)
        jpegs = list(dataset[selection])
        if CRC_DATASET in user:  # prepared with checksums: HDF5 cannot filter vlen rows
            for stored, jpeg, where in zip(user[CRC_DATASET][selection], jpegs, names, strict=True):
                if zlib.crc32(jpeg.tobytes()) != int(stored):
                    raise FlairFormatError(
                        f"{where}: the JPEG bytes fail their CRC-32 checksum; " + DAMAGED
                    )
        return StoredImages(jpegs=jpegs, names=names)

    @cached_property
    def _label_names(self) -> dict[str, dict[int, str]]:
        """{label set: {index: label}}, parsed once per reader."""
        return {
            label_set: {i: label for label, i in self.label_mapping(label_set).items()}
            for label_set in ("coarse", "fine")
        }

    def read_labels(
        self, split: str, user_id: str, label_set: LabelSet = "coarse"
    ) -> list[tuple[str, ...]]:
        """A user's label names per image, in image order, without reading any image."""
        with self._reading(f"the labels of user {user_id} of split '{split}'"):
            return self._labels(split, user_id, label_set)

    def _labels(self, split: str, user_id: str, label_set: LabelSet) -> list[tuple[str, ...]]:
        key = label_key(label_set)
        if self.layout == "central":
            group = self._require_split(split)
            return [split_labels(group[i][key][()]) for i in self._central_ids(split, user_id)]
        user = self._user_group(split, user_id)
        if self.layout == "mlflair":
            return [split_labels(joined) for joined in user[key][()]]
        rows, cols = user[f"{key}_row"][()], user[f"{key}_col"][()]
        names = self._label_names[label_set]
        check_label_indices(
            rows,
            cols,
            int(user["images"].shape[0]),
            len(names),
            f"{self.path}: split '{split}', user {user_id}: {key}_row/_col",
        )
        per_image: list[list[str]] = [[] for _ in range(int(user["images"].shape[0]))]
        for row, col in zip(rows, cols, strict=True):
            per_image[int(row)].append(names[int(col)])
        return [tuple(labels) for labels in per_image]

    def read_image(self, split: str, user_id: str, index: int) -> np.ndarray:
        """One image (uint8 H x W x 3): the `index`-th of a user, reading no other image."""
        with self._reading(f"image {index} of user {user_id} of split '{split}'"):
            if self.layout == "central":
                group = self._require_split(split)
                return np.asarray(group[self._central_ids(split, user_id)[index]]["image"][()])
            user = self._user_group(split, user_id)
            n_images = int(user["images"].shape[0])
            if not -n_images <= index < n_images:
                raise IndexError(f"{self.path}: user {user_id} has {n_images} images, no [{index}]")
            position = np.array([index % n_images])
            stored = self._pixels(user, position, f"/{split}/{user_id}/images", position)
            return stored.decoded()[0]
