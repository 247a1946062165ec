"""Load and validate FLAIR's raw release layout.

    <root>/labels_and_metadata.json   list of {user_id, image_id, labels,
                                      fine_grained_labels, partition}
    <root>/label_relationship.txt     one `fine -> coarse` pair per line
    <root>/small_images/<image_id>.jpg

Every problem raises `FlairFormatError` naming the file and the record, so a user with a
damaged download knows exactly what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from flair_fl.data.labels import SPLITS, label_mapping
from flair_fl.errors import FlairFormatError

METADATA_FILE = "labels_and_metadata.json"
RELATIONSHIP_FILE = "label_relationship.txt"
IMAGE_DIR = "small_images"
REQUIRED_FIELDS = ("user_id", "image_id", "labels", "fine_grained_labels", "partition")
HOW_TO_GET = (
    "Get the real data with `python scripts/download_flair.py --dataset-dir DIR`, or make a "
    "synthetic stand-in with `python scripts/make_synthetic.py --out DIR`."
)


@dataclass(frozen=True)
class ImageRecord:
    """One image's metadata, as listed in labels_and_metadata.json."""

    image_id: str
    user_id: str
    partition: str
    labels: tuple[str, ...]
    fine_grained_labels: tuple[str, ...]


@dataclass
class RawFlair:
    """A validated raw FLAIR directory."""

    root: Path
    records: list[ImageRecord]
    fine_to_coarse: dict[str, str]
    _by_user: dict[str, list[ImageRecord]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for record in self.records:
            self._by_user.setdefault(record.user_id, []).append(record)

    @property
    def image_dir(self) -> Path:
        return self.root / IMAGE_DIR

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def users(self) -> dict[str, list[ImageRecord]]:
        """Records grouped by user, users in order of first appearance."""
        return self._by_user

    def users_in(self, split: str) -> Iterator[tuple[str, list[ImageRecord]]]:
        for user_id, records in self._by_user.items():
            if records[0].partition == split:
                yield user_id, records

    def coarse_mapping(self) -> dict[str, int]:
        """Alphabetical index of every coarse label of label_relationship.txt.

        All of them, not only those present in the records, so a small (synthetic) set that
        lacks a rare label keeps the 17-label index (`structure` = 16). On the real data the
        two coincide; records are validated to use only these coarse labels.
        """
        return label_mapping(self.fine_to_coarse.values())

    def fine_mapping(self) -> dict[str, int]:
        """Alphabetical index of the fine-grained labels present in the records."""
        return label_mapping(label for r in self.records for label in r.fine_grained_labels)

    def read_image(self, record: ImageRecord) -> np.ndarray:
        """Decode one image to uint8 (H, W, 3); a damaged file raises FlairFormatError."""
        return decode_jpeg_file(self.image_path(record.image_id), record.image_id)


def decode_jpeg_file(path: Path, image_id: str) -> np.ndarray:
    """Fully decode a JPEG (truncation is only detected by decoding every byte)."""
    try:
        with Image.open(path) as image:
            image.load()
            array = np.asarray(image.convert("RGB"))
    except FileNotFoundError as err:
        raise FlairFormatError(f"{path}: image of record image_id={image_id} is missing") from err
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise FlairFormatError(
            f"{path}: image of record image_id={image_id} is unreadable or truncated ({err})"
        ) from err
    return array


def load_label_relationship(path: Path) -> dict[str, str]:
    """Parse `fine -> coarse` lines into {fine: coarse}."""
    if not path.is_file():
        raise FlairFormatError(f"{path}: file not found. {HOW_TO_GET}")
    mapping: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("->")]
        if len(parts) != 2 or not all(parts):
            raise FlairFormatError(f"{path}: line {number} is not `fine -> coarse`: {line!r}")
        mapping[parts[0]] = parts[1]
    return mapping


def check_name(value: str, field: str, where: str) -> str:
    """`value` (a user or image id) as an HDF5 group name and a file name stem: refused if
    empty, `.` or `..`, or holding `/`, `\\` or NUL (HDF5 would nest, alias or cut it).
    Refused rather than mapped: a renamed user would not match the published data."""
    if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise FlairFormatError(
            f"{where}: {field} {value!r} cannot be stored (an id must be non-empty, not '.' or "
            "'..', and hold no '/', '\\' or NUL)"
        )
    return value


def _parse_record(raw: object, index: int, path: Path) -> ImageRecord:
    where = f"{path}: record {index}"
    if not isinstance(raw, dict):
        raise FlairFormatError(f"{where} is not an object")
    if "image_id" in raw:
        where += f" (image_id={raw['image_id']})"
    for name in REQUIRED_FIELDS:
        if name not in raw:
            raise FlairFormatError(f"{where} is missing field '{name}'")
    for name in ("user_id", "image_id"):
        if isinstance(raw[name], bool) or not isinstance(raw[name], str | int):
            raise FlairFormatError(f"{where}: field '{name}' must be a string, got {raw[name]!r}")
    if raw["partition"] not in SPLITS:
        raise FlairFormatError(
            f"{where} has unknown partition {raw['partition']!r}; expected one of {SPLITS}"
        )
    for name in ("labels", "fine_grained_labels"):
        if not isinstance(raw[name], list) or not all(isinstance(x, str) for x in raw[name]):
            raise FlairFormatError(f"{where}: field '{name}' must be a list of strings")
    return ImageRecord(
        image_id=check_name(str(raw["image_id"]), "image_id", where),
        user_id=check_name(str(raw["user_id"]), "user_id", where),
        partition=raw["partition"],
        labels=tuple(raw["labels"]),
        fine_grained_labels=tuple(raw["fine_grained_labels"]),
    )


def check_user_partitions(records: Sequence[ImageRecord], locate: Callable[[int], str]) -> None:
    """Every image_id appears once and every user in one partition (splits are user-disjoint).

    `locate(index)` names where record `index` came from (file and record or row).
    """
    partition_of: dict[str, str] = {}
    seen_images: set[str] = set()
    for index, record in enumerate(records):
        if record.image_id in seen_images:
            raise FlairFormatError(
                f"{locate(index)} (image_id={record.image_id}): image_id appears more than once"
            )
        seen_images.add(record.image_id)
        first = partition_of.setdefault(record.user_id, record.partition)
        if first != record.partition:
            raise FlairFormatError(
                f"{locate(index)} (image_id={record.image_id}): user {record.user_id} is in two "
                f"partitions ({first} and {record.partition}); FLAIR splits are user-disjoint"
            )


def _check_consistency(records: list[ImageRecord], fine_to_coarse: dict[str, str], root: Path):
    meta = root / METADATA_FILE
    coarse_names = set(fine_to_coarse.values())
    check_user_partitions(records, lambda index: f"{meta}: record {index}")
    for index, record in enumerate(records):
        where = f"{meta}: record {index} (image_id={record.image_id})"
        for fine in record.fine_grained_labels:
            if fine not in fine_to_coarse:
                raise FlairFormatError(
                    f"{where}: fine label {fine!r} has no coarse mapping in "
                    f"{root / RELATIONSHIP_FILE}"
                )
        for coarse in record.labels:
            if coarse not in coarse_names:
                raise FlairFormatError(
                    f"{where}: coarse label {coarse!r} is not a coarse label of "
                    f"{root / RELATIONSHIP_FILE}"
                )


def load_raw_flair(root: str | Path, check_images: bool = True) -> RawFlair:
    """Load and validate a raw FLAIR directory.

    With `check_images`, every listed image must exist (decoding errors are raised when an
    image is read, since decoding 430k files here would double the cost of preparation).
    """
    root = Path(root)
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise FlairFormatError(
            f"{meta}: file not found; {root} is not a FLAIR directory. {HOW_TO_GET}"
        )
    try:
        raw_records = json.loads(meta.read_text())
    except json.JSONDecodeError as err:
        raise FlairFormatError(f"{meta}: not valid JSON ({err})") from err
    if not isinstance(raw_records, list):
        raise FlairFormatError(f"{meta}: expected a JSON list of image records")
    records = [_parse_record(r, i, meta) for i, r in enumerate(raw_records)]
    fine_to_coarse = load_label_relationship(root / RELATIONSHIP_FILE)
    _check_consistency(records, fine_to_coarse, root)
    raw = RawFlair(root=root, records=records, fine_to_coarse=fine_to_coarse)
    if check_images:
        present = {p.stem for p in raw.image_dir.glob("*.jpg")} if raw.image_dir.is_dir() else set()
        for index, record in enumerate(records):
            if record.image_id not in present:
                raise FlairFormatError(
                    f"{raw.image_path(record.image_id)}: image of record {index} "
                    f"(image_id={record.image_id}, user {record.user_id}) is missing"
                )
    return raw
