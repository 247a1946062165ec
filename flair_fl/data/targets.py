"""Multi-hot targets from the label encodings of the FLAIR HDF5 layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from flair_fl.data.labels import LABEL_DELIMITER
from flair_fl.data.raw import FlairFormatError

LabelSet = Literal["coarse", "fine"]


def label_key(label_set: LabelSet) -> str:
    """The HDF5 member name of a label set (`labels` or `fine_grained_labels`)."""
    return "labels" if label_set == "coarse" else "fine_grained_labels"


def indexed_targets(
    rows: np.ndarray,
    cols: np.ndarray,
    index: np.ndarray,
    num_images: int,
    num_labels: int,
    where: str,
) -> np.ndarray:
    """float32 (len(index), num_labels) targets of images `index` from pfl's row/col pairs.

    Row r, col c means image r carries label c; `where` names the pair in errors.
    """
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    if len(rows) != len(cols):
        raise FlairFormatError(f"{where}: row and col arrays differ in length")
    if rows.size and (rows.max() >= num_images or cols.max() >= num_labels):
        raise FlairFormatError(
            f"{where}: label index out of range (row < {num_images}, col < {num_labels} expected)"
        )
    slot = np.full(num_images, -1, dtype=np.int64)  # image -> row of the result, or -1
    slot[index] = np.arange(len(index))
    keep = slot[rows] >= 0
    targets = np.zeros((len(index), num_labels), dtype=np.float32)
    targets[slot[rows[keep]], cols[keep]] = 1.0
    return targets


def targets_from_strings(
    strings: list[bytes], mapping: dict[str, int], path: Path, user_id: str
) -> np.ndarray:
    """float32 targets from ml-flair's '|'-joined label strings, one per image."""
    targets = np.zeros((len(strings), len(mapping)), dtype=np.float32)
    for row, joined in enumerate(strings):
        for label in split_labels(joined):
            if label not in mapping:
                raise FlairFormatError(
                    f"{path}: user {user_id}: label {label!r} is not in the file's label metadata"
                )
            targets[row, mapping[label]] = 1.0
    return targets


def split_labels(joined: bytes | str) -> tuple[str, ...]:
    """ml-flair's '|'-joined label string -> label names."""
    text = joined.decode() if isinstance(joined, bytes) else str(joined)
    return tuple(filter(None, text.split(LABEL_DELIMITER)))
