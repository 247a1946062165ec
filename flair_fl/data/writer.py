"""Write FLAIR into an open HDF5 file: structure and labels first, then images in any order.

Layouts:
- `pfl` (default): pfl-research's per-user layout with row/col label indices and
  `/metadata/{label_mapping,fine_grained_label_mapping}`.
- `mlflair`: ml-flair's per-user layout, labels as '|'-joined strings and label counters.
- `central`: ml-flair's `--not_group_data_by_user` layout, one group per image.

Stores: `uint8` (decoded pixels, what pfl-research and ml-flair read) or `jpeg` (the original
encoded bytes of each image as a variable-length uint8 array; per-user layouts only; read
by flair_fl.data.hdf5.FlairHDF5 alone).

With `checksum`, every array dataset carries HDF5's fletcher32 checksum (images chunked one
per chunk), and the JPEG store, whose variable-length rows HDF5 cannot filter, keeps a CRC-32
per image in `images_crc32`: a damaged file then fails on read, naming the file and dataset,
instead of training on changed pixels.

Because the whole structure is written up front, images may arrive in any order (a parquet
file need not be grouped by user); `finish` checks that every image was written.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import h5py
import numpy as np

from flair_fl.data.decode import Block
from flair_fl.data.labels import LABEL_DELIMITER, SPLITS, mapping_to_json
from flair_fl.data.raw import ImageRecord
from flair_fl.errors import FlairFormatError

Layout = Literal["pfl", "mlflair", "central"]
LAYOUTS: tuple[str, ...] = ("pfl", "mlflair", "central")
Store = Literal["uint8", "jpeg"]
STORES: tuple[str, ...] = ("uint8", "jpeg")
NUM_IMAGES_INDEX = "/metadata/flair_fl_num_images"  # our extra: {split: {user: n}}, for speed
LAYOUT_ATTR, STORE_ATTR = "flair_fl_layout", "flair_fl_store"
JPEG_DTYPE = h5py.vlen_dtype(np.uint8)
CRC_DATASET = "images_crc32"  # JPEG store with checksums: zlib.crc32 of each image's bytes


@dataclass
class Catalog:
    """Everything but the pixels: users, their image records, label indices."""

    source: str  # names the input in error messages
    users: dict[str, list[ImageRecord]]  # order of first appearance; images in source order
    coarse_mapping: dict[str, int]
    fine_mapping: dict[str, int]
    num_images: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_images = sum(len(records) for records in self.users.values())

    def records(self) -> list[ImageRecord]:
        return [record for records in self.users.values() for record in records]


def check_layout_and_store(layout: str, store: str) -> None:
    """Reject unknown names and the combination our reader alone could not serve."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if store not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {store!r}")
    if store == "jpeg" and layout == "central":
        raise ValueError("store='jpeg' needs a per-user layout (pfl or mlflair), not central")


class HDF5Writer:
    """Fills an open, empty HDF5 file from a catalog and decoded image blocks."""

    def __init__(
        self, h5: h5py.File, catalog: Catalog, layout: Layout, store: Store, checksum: bool = False
    ):
        check_layout_and_store(layout, store)
        self.h5, self.catalog, self.layout, self.store = h5, catalog, layout, store
        self.checksum = checksum
        self.split_of = {user: records[0].partition for user, records in catalog.users.items()}
        self.written: Counter[str] = Counter()

    def write_structure(self) -> None:
        """Groups, image ids, labels and metadata: everything but the images."""
        self.h5.attrs[LAYOUT_ATTR] = self.layout
        self.h5.attrs[STORE_ATTR] = self.store
        if self.layout == "central":
            self._central_structure()
        else:
            self._per_user_structure()
        if self.layout == "pfl":
            self.h5["/metadata/label_mapping"] = mapping_to_json(self.catalog.coarse_mapping)
            self.h5["/metadata/fine_grained_label_mapping"] = mapping_to_json(
                self.catalog.fine_mapping
            )
        else:
            self._write_counters()

    def write(self, block: Block) -> None:
        """Store a block of consecutive images of one user."""
        records = self.catalog.users[block.user_id]
        end = block.start + len(block)
        if end > len(records):
            raise FlairFormatError(
                f"{self.catalog.source}: user {block.user_id} has {len(records)} images, "
                f"got images {block.start}..{end - 1}"
            )
        if self.layout == "central":
            assert block.pixels is not None
            split = self.split_of[block.user_id]
            for record, pixels in zip(records[block.start : end], block.pixels, strict=True):
                group = self.h5[f"/{split}/{record.image_id}"]
                self._put(group, "image", pixels)
        else:
            images = self._images_dataset(block)
            if block.encoded is not None:
                _write_encoded(images, block.start, block.encoded)
                if self.checksum:
                    crcs = [zlib.crc32(data) for data in block.encoded]
                    images.parent[CRC_DATASET][block.start : end] = crcs
            else:
                images[block.start : end] = block.pixels
        self.written[block.user_id] += len(block)

    def finish(self) -> None:
        """Check that every image of every user was written exactly once."""
        for user_id, records in self.catalog.users.items():
            if self.written[user_id] != len(records):
                raise FlairFormatError(
                    f"{self.catalog.source}: user {user_id}: {self.written[user_id]} of "
                    f"{len(records)} images were written"
                )

    def _images_dataset(self, block: Block) -> h5py.Dataset:
        group = self.h5[f"/{self.split_of[block.user_id]}/{block.user_id}"]
        n = len(self.catalog.users[block.user_id])
        if "images" not in group:
            if self.store == "jpeg":
                images = group.create_dataset("images", shape=(n,), dtype=JPEG_DTYPE)
                images.attrs["image_shape"] = block.shape
                if self.checksum:
                    group.create_dataset(CRC_DATASET, shape=(n,), dtype=np.uint32, fletcher32=True)
            else:
                chunks = {"chunks": (1, *block.shape), "fletcher32": True} if self.checksum else {}
                images = group.create_dataset(
                    "images", shape=(n, *block.shape), dtype=np.uint8, **chunks
                )
            return images
        images = group["images"]
        first = tuple(images.attrs["image_shape"]) if self.store == "jpeg" else images.shape[1:]
        if tuple(first) != block.shape:
            raise FlairFormatError(
                f"{self.catalog.source}: user {block.user_id} has images of different shapes "
                f"({block.shape} vs {tuple(first)})"
            )
        return images

    def _put(self, group: h5py.Group, name: str, data: np.ndarray) -> None:
        """A dataset holding `data`, with a fletcher32 checksum when asked (HDF5 filters
        only non-empty arrays)."""
        filtered = self.checksum and data.ndim > 0 and data.size > 0
        group.create_dataset(name, data=data, fletcher32=filtered)

    def _per_user_structure(self) -> None:
        num_images: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
        for user_id, records in self.catalog.users.items():
            split = records[0].partition
            group = self.h5.create_group(f"/{split}/{user_id}")
            num_images[split][user_id] = len(records)
            self._put(group, "image_ids", np.asarray([r.image_id for r in records], dtype="S"))
            if self.layout == "pfl":
                self._index_labels(group, records)
            else:
                for key in ("labels", "fine_grained_labels"):
                    joined = [LABEL_DELIMITER.join(getattr(r, key)) for r in records]
                    self._put(group, key, np.asarray(joined, dtype="S"))
        self.h5[NUM_IMAGES_INDEX] = json.dumps(num_images)

    def _index_labels(self, group: h5py.Group, records: list[ImageRecord]) -> None:
        for key, mapping in (
            ("labels", self.catalog.coarse_mapping),
            ("fine_grained_labels", self.catalog.fine_mapping),
        ):
            rows = [j for j, r in enumerate(records) for _ in getattr(r, key)]
            cols = [mapping[x] for r in records for x in getattr(r, key)]
            row_type = np.uint16 if len(records) < 2**16 else np.uint32
            self._put(group, f"{key}_row", np.asarray(rows, dtype=row_type))
            col_type = np.uint8 if len(mapping) < 256 else np.uint16
            self._put(group, f"{key}_col", np.asarray(cols, dtype=col_type))

    def _central_structure(self) -> None:
        for records in self.catalog.users.values():
            for record in records:
                if record.partition not in self.h5:  # creation order keeps each user's order
                    self.h5.create_group(record.partition, track_order=True)
                group = self.h5.create_group(f"/{record.partition}/{record.image_id}")
                group["labels"] = LABEL_DELIMITER.join(record.labels)
                group["fine_grained_labels"] = LABEL_DELIMITER.join(record.fine_grained_labels)
                group["user_id"] = record.user_id

    def _write_counters(self) -> None:
        records = self.catalog.records()
        coarse = Counter(dict.fromkeys(self.catalog.coarse_mapping, 0))  # absent keep an index
        coarse.update(x for r in records for x in r.labels)
        fine = Counter(x for r in records for x in r.fine_grained_labels)
        self.h5["/metadata/label_counter"] = json.dumps(coarse)
        self.h5["/metadata/fine_grained_label_counter"] = json.dumps(fine)


def _write_encoded(images: h5py.Dataset, start: int, encoded: list[bytes]) -> None:
    """Store JPEG bytes as variable-length rows: one slice write when h5py allows it.

    h5py turns an object array of equally long arrays into a 2-D array and refuses the
    write ("Can't broadcast"), so blocks whose JPEGs all have one length (a single-image
    user, say) are written row by row.
    """
    rows = [np.frombuffer(data, dtype=np.uint8) for data in encoded]
    if len({len(row) for row in rows}) > 1:
        values = np.empty(len(rows), dtype=JPEG_DTYPE)
        for index, row in enumerate(rows):
            values[index] = row
        images[start : start + len(rows)] = values
    else:
        for offset, row in enumerate(rows):
            images[start + offset] = row
