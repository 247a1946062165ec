"""Where exploration reads from: a raw FLAIR directory or a prepared HDF5 (any layout).

Both expose the same small interface, reading labels one user at a time and pixels only for
the images that are drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.raw import load_label_relationship, load_raw_flair
from flair_fl.errors import FlairFormatError


@dataclass(frozen=True)
class ImageLabels:
    """The coarse and fine-grained label names of one image."""

    coarse: tuple[str, ...]
    fine: tuple[str, ...]


class LabelSource(Protocol):
    """What exploration needs from a dataset."""

    description: str

    def splits(self) -> list[str]:
        """The splits that hold users, in train/val/test order."""
        ...

    def coarse_labels(self) -> list[str]:
        """The coarse vocabulary (labels present in the dataset), alphabetical."""
        ...

    def fine_to_coarse(self) -> dict[str, str] | None:
        """The declared fine -> coarse relationship, or None when the source lacks it."""
        ...

    def users(self, split: str) -> dict[str, int]:
        """{user_id: number of images} of a split."""
        ...

    def read_labels(self, split: str, user_id: str) -> list[ImageLabels]:
        """One user's labels per image, reading no image."""
        ...

    def read_image(self, split: str, user_id: str, index: int) -> np.ndarray:
        """The `index`-th image of a user, uint8 (H, W, 3)."""
        ...


class RawSource:
    """A raw FLAIR directory (labels_and_metadata.json + label_relationship.txt)."""

    def __init__(self, root: Path):
        # Listing 430k image files is not needed for statistics; drawn images are decoded.
        self.raw = load_raw_flair(root, check_images=False)
        self.description = f"{root} (raw FLAIR directory)"
        self._by_split = {
            split: dict(self.raw.users_in(split)) for split in ("train", "val", "test")
        }

    def splits(self) -> list[str]:
        return [split for split, users in self._by_split.items() if users]

    def coarse_labels(self) -> list[str]:
        return list(self.raw.coarse_mapping())

    def fine_to_coarse(self) -> dict[str, str] | None:
        return self.raw.fine_to_coarse

    def users(self, split: str) -> dict[str, int]:
        return {user: len(records) for user, records in self._by_split[split].items()}

    def read_labels(self, split: str, user_id: str) -> list[ImageLabels]:
        records = self._by_split[split][user_id]
        return [ImageLabels(r.labels, r.fine_grained_labels) for r in records]

    def read_image(self, split: str, user_id: str, index: int) -> np.ndarray:
        return self.raw.read_image(self._by_split[split][user_id][index])


class HDF5Source:
    """A prepared FLAIR HDF5 file in the pfl, mlflair or central layout."""

    def __init__(self, path: Path, relationship: Path | None = None):
        self.reader = FlairHDF5(path)
        self.description = f"{path} (HDF5, {self.reader.layout} layout)"
        self._relationship = load_label_relationship(relationship) if relationship else None

    def splits(self) -> list[str]:
        return [s for s in self.reader.splits() if len(self.reader.h5[s]) > 0]

    def coarse_labels(self) -> list[str]:
        mapping = self.reader.label_mapping("coarse")
        return sorted(mapping, key=mapping.__getitem__)

    def fine_to_coarse(self) -> dict[str, str] | None:
        return self._relationship

    def users(self, split: str) -> dict[str, int]:
        return self.reader.population(split)

    def read_labels(self, split: str, user_id: str) -> list[ImageLabels]:
        coarse = self.reader.read_labels(split, user_id, "coarse")
        fine = self.reader.read_labels(split, user_id, "fine")
        if len(coarse) != len(fine):
            raise FlairFormatError(
                f"{self.reader.path}: user {user_id}: {len(coarse)} coarse but "
                f"{len(fine)} fine label entries"
            )
        return [ImageLabels(c, f) for c, f in zip(coarse, fine, strict=True)]

    def read_image(self, split: str, user_id: str, index: int) -> np.ndarray:
        return self.reader.read_image(split, user_id, index)


def open_source(path: str | Path, relationship: str | Path | None = None) -> LabelSource:
    """A raw directory or an HDF5 file, told apart by what `path` is."""
    path = Path(path)
    if path.is_dir():
        return RawSource(path)
    if not path.exists():
        raise FlairFormatError(f"{path}: no such raw FLAIR directory or HDF5 file")
    return HDF5Source(path, Path(relationship) if relationship else None)
