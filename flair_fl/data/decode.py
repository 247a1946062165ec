"""JPEG decoding for preparation and reading, and an ordered, bounded worker pool.

Preparation decodes with PIL (what pfl-research's and ml-flair's scripts store); the reader of
the compact JPEG-bytes variant decodes with `torchvision.io.decode_jpeg` on CPU. Both use
libjpeg-turbo with the same defaults (integer IDCT, fancy upsampling) and return identical
arrays for the same bytes: checked on 4:2:0 / 4:2:2 / 4:4:4, progressive, optimised,
greyscale and CMYK JPEGs (tests/test_compact.py). GPU decoding (nvjpeg) is not bit-exact
and is not used here.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from flair_fl.data.raw import FlairFormatError

T = TypeVar("T")
R = TypeVar("R")


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode every byte of a JPEG (truncation shows only then) to uint8 (H, W, 3) RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise FlairFormatError(f"{where} is unreadable or truncated ({err})") from err


def decode_stored_jpegs(encoded: Sequence[np.ndarray], where: Callable[[int], str]) -> np.ndarray:
    """Decode stored JPEG bytes (1-D uint8 arrays) with torchvision to uint8 (N, H, W, 3).

    One call per image, so a damaged one is named (on CPU, torchvision's list form loops
    the same way).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    arrays = [np.ascontiguousarray(e, dtype=np.uint8) for e in encoded]
    tensors = [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays]
    images: list[np.ndarray] = []
    for index, tensor in enumerate(tensors):
        try:
            images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy())
        except RuntimeError as err:
            raise FlairFormatError(
                f"{where(index)}: stored JPEG bytes do not decode ({err})"
            ) from err
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise FlairFormatError(f"{where(0)}: images of different shapes {sorted(shapes)}")
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), dtype=np.uint8)


@dataclass(frozen=True)
class ImageSource:
    """One image to load: its encoded bytes, or the path of a file holding them."""

    image_id: str
    where: str  # a path, or `file.parquet: row N`: names the image in errors
    data: bytes | None = None  # None: read the file at `where`

    def describe(self) -> str:
        return f"{self.where}: image of record image_id={self.image_id}"

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        try:
            return Path(self.where).read_bytes()
        except FileNotFoundError as err:
            raise FlairFormatError(f"{self.describe()} is missing") from err


@dataclass(frozen=True)
class BlockJob:
    """Consecutive images of one user, starting at image `start` of that user."""

    user_id: str
    start: int
    images: list[ImageSource]
    keep_encoded: bool  # JPEG-bytes store: return the original bytes (decoded only to check)


@dataclass
class Block:
    """A decoded `BlockJob`: pixels (uint8 store) or the original bytes (JPEG store)."""

    user_id: str
    start: int
    shape: tuple[int, ...]  # (H, W, 3), the same for every image of the block
    pixels: np.ndarray | None = None
    encoded: list[bytes] | None = None

    def __len__(self) -> int:
        if self.encoded is not None:
            return len(self.encoded)
        return 0 if self.pixels is None else len(self.pixels)


def load_block(job: BlockJob) -> Block:
    """Read and fully decode a job's images (runs in a decoding thread with --workers)."""
    encoded = [source.read() for source in job.images]
    pixels = [decode_image(data, s.describe()) for data, s in zip(encoded, job.images, strict=True)]
    for image, source in zip(pixels, job.images, strict=True):
        if image.shape != pixels[0].shape:
            raise FlairFormatError(
                f"{source.describe()}: shape {image.shape} differs from the shape "
                f"{pixels[0].shape} of other images of user {job.user_id}"
            )
    shape = tuple(pixels[0].shape)
    if job.keep_encoded:
        return Block(job.user_id, job.start, shape, encoded=encoded)
    return Block(job.user_id, job.start, shape, pixels=np.stack(pixels))


def ordered_map(fn: Callable[[T], R], jobs: Iterable[T], workers: int) -> Iterator[R]:
    """`map(fn, jobs)` in job order; with `workers` > 1 in that many threads.

    Threads, not processes: PIL's and torchvision's JPEG decoders release the GIL, so
    threads decode in parallel without pickling every decoded image back to the parent.
    At most 2 x workers jobs are in flight, so memory stays bounded however many jobs the
    (lazy) iterable yields.
    """
    if workers <= 1:
        yield from map(fn, jobs)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for job in jobs:
                pending.append(pool.submit(fn, job))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
