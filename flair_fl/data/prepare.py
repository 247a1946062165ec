"""FLAIR (raw directory or Hugging Face parquet) -> one HDF5 file, streaming, atomically.

Memory is bounded whatever the dataset size: images are decoded and written in blocks of at
most `WRITE_CHUNK` images of one user (`PARALLEL_CHUNK` per job with decoding threads, at
most 2 jobs per thread in flight). The file is written as `<output>.partial` and renamed
at the end, so an interrupted run never leaves a file that looks complete.

Layouts and stores: see flair_fl.data.writer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
from tqdm import tqdm

from flair_fl.artifacts.durable import NO_SPACE
from flair_fl.data.decode import BlockJob, ImageSource, load_block, ordered_map
from flair_fl.data.parquet import load_parquet_flair, parquet_files
from flair_fl.data.raw import RawFlair, load_raw_flair
from flair_fl.data.writer import (
    LAYOUTS,
    NUM_IMAGES_INDEX,
    STORES,
    Catalog,
    HDF5Writer,
    Layout,
    Store,
    check_layout_and_store,
)
from flair_fl.errors import FlairFormatError, OutputWriteError

__all__ = [
    "LAYOUTS",
    "NUM_IMAGES_INDEX",
    "STORES",
    "Layout",
    "Store",
    "prepare_flair",
    "prepare_parquet",
]

WRITE_CHUNK = 256  # images decoded and written at a time: bounds memory for any user size
PARALLEL_CHUNK = 32  # images per job with decoding threads (jobs in flight: 2 per thread)


def prepare_flair(
    dataset_dir: str | Path,
    output: str | Path,
    layout: Layout = "pfl",
    progress: bool = True,
    store: Store = "uint8",
    workers: int = 0,
    checksum: bool = False,
) -> Path:
    """Convert a raw FLAIR directory to HDF5 and return the output path.

    `store="jpeg"` keeps each image's original JPEG bytes instead of decoded pixels (every
    image is still decoded once, to reject damaged files now rather than in training).
    `workers` > 1 decodes in that many threads (the JPEG decoder releases the GIL).

    A missing, truncated or otherwise undecodable image stops preparation with a
    FlairFormatError naming the image's file and image_id; there is deliberately no
    skip-and-count option, since a silently smaller dataset would change FLAIR's published
    user and image counts (re-download the file instead). The output is written as
    `<output>.partial` and renamed only when complete, so a failure leaves no file under the
    output name (an earlier, complete output there is kept). `checksum` adds HDF5 fletcher32
    checksums (and a CRC-32 per JPEG), so damage to the file is detected when it is read.
    """
    check_layout_and_store(layout, store)
    raw = load_raw_flair(dataset_dir)
    catalog = Catalog(str(raw.root), raw.users(), raw.coarse_mapping(), raw.fine_mapping())
    jobs = _raw_jobs(raw, _chunk(workers), keep_encoded=store == "jpeg")
    return _write(catalog, jobs, Path(output), layout, store, workers, progress, checksum)


def prepare_parquet(
    sources: Sequence[str | Path],
    output: str | Path,
    layout: Layout = "pfl",
    progress: bool = True,
    store: Store = "uint8",
    workers: int = 0,
    checksum: bool = False,
) -> Path:
    """Convert FLAIR parquet files (Hugging Face `apple/flair`) to the same HDF5.

    `sources` are parquet files or directories holding them. The result equals what
    `prepare_flair` writes from the raw directory of the same data.
    """
    check_layout_and_store(layout, store)
    flair = load_parquet_flair(parquet_files(sources))
    jobs = flair.jobs(_chunk(workers), keep_encoded=store == "jpeg")
    return _write(flair.catalog, jobs, Path(output), layout, store, workers, progress, checksum)


def _chunk(workers: int) -> int:
    return PARALLEL_CHUNK if workers > 1 else WRITE_CHUNK


def _raw_jobs(raw: RawFlair, chunk: int, keep_encoded: bool) -> Iterator[BlockJob]:
    for user_id, records in raw.users().items():
        for start in range(0, len(records), chunk):
            sources = [
                ImageSource(r.image_id, str(raw.image_path(r.image_id)))
                for r in records[start : start + chunk]
            ]
            yield BlockJob(user_id, start, sources, keep_encoded)


def write_failure(output: Path, partial: Path, err: BaseException) -> OutputWriteError:
    """One line for a failed HDF5 write; h5py reports the OS error inside its message."""
    text = str(err)
    match = re.search(r"errno = (\d+)", text)
    code = int(match.group(1)) if match else getattr(err, "errno", None)
    if code in NO_SPACE:
        reason = f"the disk is full ({os.strerror(code)}); free some space and run again"
    else:
        reason = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    return OutputWriteError(code, f"{output}: could not be written: {reason} ({partial} removed)")


def _write(
    catalog: Catalog,
    jobs: Iterator[BlockJob],
    output: Path,
    layout: Layout,
    store: Store,
    workers: int,
    progress: bool,
    checksum: bool = False,
) -> Path:
    if catalog.num_images == 0:
        raise FlairFormatError(f"{catalog.source}: holds no image records; nothing to prepare")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    bar = tqdm(
        total=catalog.num_images, desc=f"prepare {output.name}", unit="img", disable=not progress
    )
    try:
        h5 = h5py.File(partial, "w")
        try:
            writer = HDF5Writer(h5, catalog, layout, store, checksum)
            writer.write_structure()
            for block in ordered_map(load_block, jobs, workers):
                writer.write(block)
                bar.update(len(block))
            writer.finish()
        except (OSError, RuntimeError) as err:
            # Not closed: closing a file whose writes failed can crash the HDF5 library
            # (scripts/prepare_flair.py runs this in a child process for that reason).
            raise write_failure(output, partial, err) from None
        except BaseException:
            h5.close()
            raise
        try:
            h5.close()
        except (OSError, RuntimeError) as err:
            raise write_failure(output, partial, err) from None
        os.replace(partial, output)
    finally:
        bar.close()
        partial.unlink(missing_ok=True)
    return output
