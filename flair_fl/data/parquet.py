"""FLAIR's Hugging Face copy (`apple/flair`): parquet files -> catalog and image jobs.

One row per image: user_id (string), image_id (int64), labels (list<string>), partition
(string: train / val / test), fine_grained_labels (list<string>) and image, the `datasets`
Image feature: struct<bytes: binary, path: string> holding the original 256 px JPEG.

Reading is two streaming passes, so memory stays bounded at full scale: the label columns
first (a few tens of MB for 430k rows), then the images one row group at a time. Rows need
not be grouped by user. pyarrow is an optional dependency (`pip install -e '.[hf]'`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flair_fl.data.decode import BlockJob, ImageSource
from flair_fl.data.labels import COARSE_LABELS, SPLITS, label_mapping
from flair_fl.data.raw import ImageRecord, check_name, check_user_partitions
from flair_fl.data.writer import Catalog
from flair_fl.errors import FlairFormatError

LABEL_COLUMNS = ("user_id", "image_id", "labels", "partition", "fine_grained_labels")
IMAGE_COLUMN = "image"


def _parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            "Reading FLAIR parquet files needs pyarrow: pip install -e '.[hf]'"
        ) from err
    return pq


def parquet_files(sources: Sequence[str | Path]) -> list[Path]:
    """The parquet files named, or found (recursively, sorted) in the directories named."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(source.rglob("*.parquet"))
        elif source.is_file():
            files.append(source)
        else:
            raise FlairFormatError(f"{source}: no such parquet file or directory")
    if not files:
        raise FlairFormatError(
            f"{', '.join(map(str, sources))}: no *.parquet files (download them with "
            "`python scripts/download_flair.py --source huggingface --dataset-dir DIR`)"
        )
    return files


@dataclass
class ParquetFlair:
    """The catalog of a set of parquet files and where each row's image goes."""

    files: list[Path]
    catalog: Catalog
    row_slots: list[tuple[str, int]]  # per row, in file order: (user_id, index within user)
    file_starts: list[int]  # global index of each file's first row

    def locate(self, row: int) -> str:
        """`file: row N` for a global row index."""
        file = bisect.bisect_right(self.file_starts, row) - 1
        return f"{self.files[file]}: row {row - self.file_starts[file]}"

    def jobs(self, chunk: int, keep_encoded: bool) -> Iterator[BlockJob]:
        """Image jobs in file order: runs of consecutive images of one user, <= chunk long."""
        row = 0
        for file in self.files:
            for blobs in _image_bytes(file, chunk):
                run: list[ImageSource] = []
                run_user, run_start = "", 0
                for blob in blobs:
                    user_id, index = self.row_slots[row]
                    if blob is None:
                        raise FlairFormatError(f"{self.locate(row)}: image has no bytes")
                    if run and (user_id != run_user or index != run_start + len(run)):
                        yield BlockJob(run_user, run_start, run, keep_encoded)
                        run = []
                    if not run:
                        run_user, run_start = user_id, index
                    image_id = self.catalog.users[user_id][index].image_id
                    run.append(ImageSource(image_id, self.locate(row), blob))
                    row += 1
                if run:
                    yield BlockJob(run_user, run_start, run, keep_encoded)


def _image_bytes(file: Path, chunk: int) -> Iterator[list[bytes | None]]:
    """The image bytes of a file, in row order, at most `chunk` at a time.

    Read one row group at a time: pyarrow's `iter_batches` buffers a whole file's column
    (hundreds of MB per apple/flair file); a row group is ~100 images there.
    """
    reader = _parquet().ParquetFile(file)
    for group in range(reader.num_row_groups):
        try:
            table = reader.read_row_group(group, columns=[IMAGE_COLUMN], use_threads=False)
            blobs = table.column(IMAGE_COLUMN).combine_chunks().field("bytes").to_pylist()
        except Exception as err:  # pyarrow: ArrowInvalid, OSError, ... for damaged pages
            raise _damaged(file, f"row group {group}", err) from None
        del table
        for start in range(0, len(blobs), chunk):
            yield blobs[start : start + chunk]


def _damaged(file: Path, what: str, err: Exception) -> FlairFormatError:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return FlairFormatError(
        f"{file}: {what} cannot be read ({reason}); the file is damaged: download it again"
    )


def load_parquet_flair(files: Sequence[Path]) -> ParquetFlair:
    """Read and validate the label columns of FLAIR parquet files (no image is read)."""
    pq = _parquet()
    records: list[ImageRecord] = []
    file_starts: list[int] = []
    for file in files:
        file_starts.append(len(records))
        try:
            reader = pq.ParquetFile(file)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for bad files
            raise FlairFormatError(f"{file}: not a readable parquet file ({err})") from err
        missing = [c for c in (*LABEL_COLUMNS, IMAGE_COLUMN) if c not in reader.schema_arrow.names]
        if missing:
            raise FlairFormatError(
                f"{file}: missing column(s) {missing}; expected apple/flair's columns "
                f"{[*LABEL_COLUMNS, IMAGE_COLUMN]}"
            )
        try:
            batches = list(reader.iter_batches(batch_size=65536, columns=list(LABEL_COLUMNS)))
        except Exception as err:  # pyarrow: ArrowInvalid, OSError, ... for damaged pages
            raise _damaged(file, "the label columns", err) from None
        for batch in batches:
            for row in batch.to_pylist():
                records.append(_record(row, file, len(records) - file_starts[-1]))
    flair = ParquetFlair(list(files), _catalog(records, files), [], file_starts)
    check_user_partitions(records, flair.locate)
    position: dict[str, int] = {}
    for record in records:
        index = position.get(record.user_id, 0)
        flair.row_slots.append((record.user_id, index))
        position[record.user_id] = index + 1
    return flair


def _record(row: dict[str, Any], file: Path, index: int) -> ImageRecord:
    where = f"{file}: row {index}"
    if row["partition"] not in SPLITS:
        raise FlairFormatError(
            f"{where}: unknown partition {row['partition']!r}; expected one of {SPLITS}"
        )
    for name in ("user_id", "image_id"):
        if row[name] is None:
            raise FlairFormatError(f"{where}: {name} is empty")
    for name in ("labels", "fine_grained_labels"):
        if not isinstance(row[name], list) or not all(isinstance(x, str) for x in row[name]):
            raise FlairFormatError(f"{where}: {name} must be a list of strings")
    return ImageRecord(
        image_id=check_name(str(row["image_id"]), "image_id", where),  # int64 here, str in JSON
        user_id=check_name(str(row["user_id"]), "user_id", where),
        partition=row["partition"],
        labels=tuple(row["labels"]),
        fine_grained_labels=tuple(row["fine_grained_labels"]),
    )


def _catalog(records: list[ImageRecord], files: Sequence[Path]) -> Catalog:
    """Index labels as the raw route does.

    The parquet copy has no label_relationship.txt, so the coarse index is FLAIR's 17 coarse
    labels plus any other present (on the real data the two are the same; a small set that
    lacks a rare label keeps `structure` = 16, as from the raw directory).
    """
    users: dict[str, list[ImageRecord]] = {}
    for record in records:
        users.setdefault(record.user_id, []).append(record)
    coarse = label_mapping([*COARSE_LABELS, *(x for r in records for x in r.labels)])
    fine = label_mapping(x for r in records for x in r.fine_grained_labels)
    source = str(files[0].parent) if len(files) > 1 else str(files[0])
    return Catalog(source, users, coarse, fine)
