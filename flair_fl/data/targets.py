"""Multi-hot targets from the label encodings of the FLAIR HDF5 layouts."""

from __future__ import annotations

from typing import Literal

import numpy as np

from flair_fl.data.labels import LABEL_DELIMITER
from flair_fl.errors import FlairFormatError

LabelSet = Literal["coarse", "fine"]


def label_key(label_set: LabelSet) -> str:
    """The HDF5 member name of a label set (`labels` or `fine_grained_labels`)."""
    return "labels" if label_set == "coarse" else "fine_grained_labels"


def check_label_indices(
    rows: np.ndarray, cols: np.ndarray, num_images: int, num_labels: int, where: str
) -> None:
    """pfl's (image, label) index pairs must pair up and point inside the user's images and
    the label mapping; `where` names the file, split and user in errors."""
    if len(rows) != len(cols):
        raise FlairFormatError(
            f"{where}: {len(rows)} row indices but {len(cols)} col indices (they must match)"
        )
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    bad_cols = cols[(cols < 0) | (cols >= num_labels)]
    if bad_cols.size:
        raise FlairFormatError(
            f"{where}: label index {int(bad_cols[0])} is outside the label mapping of "
            f"{num_labels} labels (valid: 0..{num_labels - 1})"
        )
    bad_rows = rows[(rows < 0) | (rows >= num_images)]
    if bad_rows.size:
        raise FlairFormatError(
            f"{where}: image index {int(bad_rows[0])} but the user has {num_images} images"
        )


def indexed_targets(
    rows: np.ndarray,
    cols: np.ndarray,
    index: np.ndarray,
    num_images: int,
    num_labels: int,
    where: str,
) -> np.ndarray:
    """float32 (len(index), num_labels) targets of images `index` from pfl's row/col pairs.

    Row r, col c means image r carries label c; `where` names the pairs in errors.
    """
    check_label_indices(rows, cols, num_images, num_labels, where)
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    slot = np.full(num_images, -1, dtype=np.int64)  # image -> row of the result, or -1
    slot[index] = np.arange(len(index))
    keep = slot[rows] >= 0
    targets = np.zeros((len(index), num_labels), dtype=np.float32)
    targets[slot[rows[keep]], cols[keep]] = 1.0
    return targets


def targets_from_strings(strings: list[bytes], mapping: dict[str, int], where: str) -> np.ndarray:
    """float32 targets from ml-flair's '|'-joined label strings, one per image; `where`
    names the file, split and user in errors."""
    targets = np.zeros((len(strings), len(mapping)), dtype=np.float32)
    for row, joined in enumerate(strings):
        for label in split_labels(joined):
            if label not in mapping:
                raise FlairFormatError(
                    f"{where}: label {label!r} is not in the file's label metadata "
                    f"({len(mapping)} labels)"
                )
            targets[row, mapping[label]] = 1.0
    return targets


def split_labels(joined: bytes | str) -> tuple[str, ...]:
    """ml-flair's '|'-joined label string -> label names."""
    text = joined.decode() if isinstance(joined, bytes) else str(joined)
    return tuple(filter(None, text.split(LABEL_DELIMITER)))
