"""FLAIR label vocabulary and the coarse label frequencies of the real dataset."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

# The 17 coarse labels in alphabetical order (the index order of every FLAIR reference)
# with the share of all images carrying each (FLAIR release statistics).
COARSE_LABEL_SHARES: dict[str, float] = {
    "animal": 0.160,
    "art": 0.087,
    "celebration": 0.009,
    "equipment": 0.526,
    "fire": 0.007,
    "food": 0.258,
    "games": 0.0025,
    "interior_room": 0.075,
    "light": 0.026,
    "liquid": 0.160,
    "material": 0.326,
    "music": 0.006,
    "outdoor": 0.306,
    "plant": 0.288,
    "recreation": 0.013,
    "religion": 0.002,
    "structure": 0.534,
}
COARSE_LABELS: tuple[str, ...] = tuple(sorted(COARSE_LABEL_SHARES))

LABEL_DELIMITER = "|"  # ml-flair joins an image's labels with this in its HDF5 layout
SPLITS: tuple[str, ...] = ("train", "val", "test")


def label_mapping(labels: Iterable[str]) -> dict[str, int]:
    """Index labels alphabetically, as pfl-research and ml-flair do (`animal` = 0)."""
    return {label: index for index, label in enumerate(sorted(set(labels)))}


def mapping_to_json(mapping: Mapping[str, int]) -> str:
    """Serialise a label mapping the way the reference HDF5 files store it."""
    return json.dumps(dict(mapping))
