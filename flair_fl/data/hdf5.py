"""Read prepared FLAIR HDF5 files in any of the three layouts, detected automatically.

- `pfl`: pfl-research's per-user layout (row/col label indices, label_mapping metadata);
- `mlflair`: ml-flair's per-user layout ('|'-joined label strings, label_counter metadata);
- `central`: ml-flair's one-group-per-image layout (`--not_group_data_by_user`).

Each per-user layout comes in two stores, also detected automatically: `uint8` (decoded
pixels) and the compact `jpeg` store (the original JPEG bytes of each image as a
variable-length uint8 array, decoded here with torchvision; identical pixels, see
flair_fl.data.decode).

Where each layout keeps images and labels: hdf5_layouts.py. File handles are opened lazily
and cached per process, so a reader can be pickled into Ray actors and DataLoader workers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from flair_fl.data.hdf5_layouts import DAMAGED, Layout, StoredUser, UserData, detect_layout
from flair_fl.data.labels import SPLITS
from flair_fl.data.targets import LabelSet, label_key
from flair_fl.data.writer import NUM_IMAGES_INDEX
from flair_fl.errors import FlairFormatError

log = logging.getLogger(__name__)
_HANDLES: dict[tuple[str, int], h5py.File] = {}

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
    def format(self) -> Layout:
        """Where this file keeps users' images and labels (hdf5_layouts.py)."""
        return detect_layout(self, SPLITS)

    @property
    def layout(self) -> str:
        """The layout's name: `pfl`, `mlflair` or `central`."""
        return self.format.name

    @cached_property
    def store(self) -> str:
        """`uint8` (decoded pixels) or `jpeg` (original JPEG bytes, decoded when read)."""
        return self.format.store()

    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.h5]

    def split_group(self, split: str) -> h5py.Group:
        """The group of a split (FlairFormatError naming the splits there if it is missing)."""
        try:
            return self.h5[split]
        except KeyError:
            raise FlairFormatError(
                f"{self.path}: has no '{split}' split "
                f"(it has: {', '.join(self.splits()) or 'none'})"
            ) from None

    def label_mapping(self, label_set: LabelSet = "coarse") -> dict[str, int]:
        """{label: index}, alphabetical (the index order every FLAIR reference uses).

        Parsed once per reader: clients ask for it with every user they read.
        """
        return self._mappings[label_set]

    @cached_property
    def _mappings(self) -> dict[str, dict[str, int]]:
        return self.format.mappings()

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
        self.split_group(split)
        if NUM_IMAGES_INDEX in self.h5:  # parsed once per reader (every evaluation asks)
            return self._num_images_index[split]
        return self.format.sizes(split)

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
            n_total = self.format.user_size(split, user_id)
            n = n_total if max_images is None else min(max_images, n_total)
            if n < n_total:
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
            n_total = self.format.user_size(split, user_id)
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

    def _warn_unordered(self, split: str) -> None:
        """Say once per split when `max_images` cuts a user of a file that keeps no image
        order, as that order decides which images are kept."""
        warned = self.__dict__.setdefault("_warned_unordered", set())
        if split in warned or not self.format.cuts_unordered(split):
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

    def _read(self, split: str, user_id: str, index: np.ndarray, label_set: LabelSet) -> StoredUser:
        """Images `index` (increasing) of a user, with their targets."""
        return self.format.read(
            split, user_id, index, self.label_mapping(label_set), label_key(label_set)
        )

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
            return self.format.labels(
                split, user_id, label_key(label_set), self._label_names[label_set]
            )

    def read_image(self, split: str, user_id: str, index: int) -> np.ndarray:
        """One image (uint8 H x W x 3): the `index`-th of a user, reading no other image."""
        with self._reading(f"image {index} of user {user_id} of split '{split}'"):
            return self.format.image(split, user_id, index)
