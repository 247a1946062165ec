"""JPEG decoding for preparation and reading, and an ordered, bounded worker pool.

Preparation decodes with PIL (what pfl-research's and ml-flair's scripts store); the reader of
the compact JPEG-bytes variant decodes with `torchvision.io.decode_jpeg`, a whole user's list
in one call. On CPU both use libjpeg-turbo with the same defaults (integer IDCT, fancy
upsampling) and return identical arrays for the same bytes: checked on 4:2:0 / 4:2:2 / 4:4:4,
progressive, optimised, greyscale and CMYK JPEGs (tests/test_compact.py). A client training on
CUDA decodes its user's list there (batched nvJPEG, `decode_jpegs(..., device)`): fast, but not
bit-exact with libjpeg-turbo (its upsampling and IDCT differ in the last grey level).
"""

from __future__ import annotations

import io
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from flair_fl.errors import FlairFormatError

if TYPE_CHECKING:  # torch is imported where decoding happens: preparation's CLIs start faster
    import torch

JPEG_MAGIC = b"\xff\xd8\xff"  # start of image, then a marker
# torchvision 0.29 warns at every decode call that TorchCodec will replace its decoders; its
# decode_jpeg is still the libjpeg-turbo path checked bit-exact against PIL here. The filter
# matches that one message (a per-call catch_warnings would race with the decoding threads).
warnings.filterwarnings(
    "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
)
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
    """Decode stored JPEG bytes (1-D uint8 arrays) with torchvision to uint8 (N, H, W, 3)."""
    import torch

    if not encoded:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return decode_jpegs(encoded, where, torch.device("cpu")).numpy()


def decode_jpegs(
    encoded: Sequence[np.ndarray], where: Callable[[int], str], device: torch.device
) -> torch.Tensor:
    """Decode a list of stored JPEGs (1-D uint8 arrays) in one call to uint8 (N, H, W, 3) on
    `device`: batched nvJPEG on CUDA, libjpeg-turbo on CPU.

    If the batch fails, each image is decoded on its own on the CPU, so a damaged one is
    named (and a JPEG nvJPEG cannot take, such as CMYK, is decoded there instead).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.from_numpy(_writeable(e)) for e in encoded]
    if device.type == "cuda":
        try:
            chw = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return decode_jpegs(encoded, where, torch.device("cpu")).to(device)
        _same_shapes([tuple(t.shape[1:]) for t in chw], where)
        return torch.stack(chw).permute(0, 2, 3, 1).contiguous()
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB)
    except RuntimeError:
        decoded = [_decode_one(t, index, where) for index, t in enumerate(tensors)]
    # libjpeg decodes to HWC; torchvision returns a CHW view of it, so this is a plain copy.
    hwc = [image.permute(1, 2, 0) for image in decoded]
    _same_shapes([tuple(t.shape[:2]) for t in hwc], where)
    return torch.stack(hwc)


def _writeable(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return array if array.flags.writeable else array.copy()  # torch.from_numpy warns otherwise


def _decode_one(data: torch.Tensor, index: int, where: Callable[[int], str]) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise FlairFormatError(f"{where(index)}: stored JPEG bytes do not decode ({err})") from err


def _same_shapes(shapes: list[tuple[int, ...]], where: Callable[[int], str]) -> None:
    if len(set(shapes)) > 1:
        raise FlairFormatError(f"{where(0)}: images of different shapes {sorted(set(shapes))}")


@dataclass(frozen=True)
class StoredImages:
    """A user's images as the file stores them: uint8 pixels (N, H, W, 3), or the JPEG bytes
    of each image (the compact store), decoded only where they are used."""

    pixels: np.ndarray | None = None
    jpegs: list[np.ndarray] | None = None
    names: tuple[str, ...] = ()  # each JPEG's place in the file, for errors

    def __len__(self) -> int:
        return len(self.jpegs) if self.jpegs is not None else len(self._pixels())

    def _pixels(self) -> np.ndarray:
        assert self.pixels is not None
        return self.pixels

    def _where(self, index: int) -> str:
        return self.names[index] if index < len(self.names) else f"image {index}"

    def decoded(self) -> np.ndarray:
        """uint8 (N, H, W, 3) on the CPU."""
        if self.jpegs is None:
            return self._pixels()
        return decode_stored_jpegs(self.jpegs, self._where)

    def to_device(self, device: torch.device) -> torch.Tensor:
        """uint8 (N, H, W, 3) on `device`; JPEGs are decoded there (nvJPEG on CUDA)."""
        import torch

        if self.jpegs is None:
            return torch.from_numpy(_writeable(self._pixels())).to(device)
        return decode_jpegs(self.jpegs, self._where, device)

    def take(self, order: Sequence[int]) -> StoredImages:
        """These images in `order`."""
        if self.jpegs is None:
            return StoredImages(pixels=self._pixels()[list(order)])
        return StoredImages(
            jpegs=[self.jpegs[i] for i in order], names=tuple(self._where(i) for i in order)
        )

    @staticmethod
    def concat(parts: Sequence[StoredImages]) -> StoredImages:
        """The images of `parts`, one after the other (all from one store)."""
        if all(p.jpegs is None for p in parts):
            return StoredImages(pixels=np.concatenate([p._pixels() for p in parts]))
        jpegs = [j for p in parts for j in p.jpegs or []]
        names = tuple(p._where(i) for p in parts for i in range(len(p)))
        return StoredImages(jpegs=jpegs, names=names)


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
    if job.keep_encoded:  # the JPEG store is decoded as JPEG: other formats cannot be read back
        for data, source in zip(encoded, job.images, strict=True):
            if not data.startswith(JPEG_MAGIC):
                raise FlairFormatError(
                    f"{source.describe()} is not a JPEG (the jpeg store keeps JPEG bytes only; "
                    "re-encode it, or prepare with --store uint8)"
                )
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
