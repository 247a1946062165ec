"""Batched image transforms on uint8 NHWC batches, on whatever device the batch is on.

The training augmentation (torchvision's RandomResizedCrop + horizontal flip, drawn per image)
and the evaluation resize both end in `to_model_input`: crop, resize with torchvision's
antialiased bilinear filter, flip, scale to [0, 1] and normalise, for a whole batch. Images
stay uint8 until here, in the layout the HDF5 store keeps them (N, H, W, 3).

The resize is PyTorch's own antialiased bilinear kernel (what torchvision's `resized_crop`
calls), one call per crop on views of the batch (no copy of the source images):
- CPU: on uint8, PyTorch's vectorised kernel; its output is rounded to uint8, exactly what
  torchvision's per-image transform gives for the same box (tests/test_augment.py).
- CUDA: on float32 (PyTorch has no uint8 antialiased kernel there); not rounded, so within
  half a grey level (0.5/255) of torchvision's uint8 result.
Measured on this project's 2-core CPU, roi_align and grid_sample on the float batch were
4-8x slower than these per-crop calls, a gather-based separable resample ~20x (README,
Performance).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults (the FLAIR benchmarks')
RATIO = (3 / 4, 4 / 3)
TRIES = 10  # torchvision's attempts before its central-crop fallback


def sample_crop_boxes(
    count: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = SCALE,
    ratio: tuple[float, float] = RATIO,
) -> torch.Tensor:
    """`count` boxes (top, left, height, width), int64 (count, 4), drawn as
    `torchvision.transforms.v2.RandomResizedCrop` draws one: up to 10 tries of an area
    fraction ~ U(scale) and a log aspect ratio ~ U(log ratio), the first that fits wins,
    then a uniform position; if none fits, the central crop of the clamped aspect ratio.

    Every box costs the same random numbers (all tries are drawn), so one draw does not
    shift the next. `generator` is a CPU generator; the boxes are on the CPU.
    """
    # One draw from the generator, then NumPy: a dozen small torch ops per batch would
    # cost more than the crops' arithmetic. Most batches hold one to four images, so the
    # NumPy calls are the cost: as few as give the same boxes (np.rint is np.round's kernel,
    # plain indexing take_along_axis's).
    uniform = torch.rand(count, 2 * TRIES + 2, generator=generator, dtype=torch.float64).numpy()
    draws = uniform[:, : 2 * TRIES].reshape(count, TRIES, 2)
    target = height * width * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(low + (high - low) * draws[..., 1])
    # Half to even, as Python's round() in torchvision does.
    w, h = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    each, first = np.arange(count), fits.argmax(axis=1)  # the first try that fits
    boxes = np.empty((count, 4), dtype=np.int64)
    boxes[:, 2], boxes[:, 3] = h[each, first], w[each, first]
    boxes[:, 0] = np.floor(uniform[:, -2] * (height - boxes[:, 2] + 1))
    boxes[:, 1] = np.floor(uniform[:, -1] * (width - boxes[:, 3] + 1))
    fallback = ~fits.any(axis=1)
    if fallback.any():
        boxes[fallback] = _central_box(height, width, ratio)
    return torch.from_numpy(boxes)


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_model_input(
    images: torch.Tensor,
    size: int,
    boxes: torch.Tensor | None = None,
    flips: torch.Tensor | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    memory_format: torch.memory_format = torch.contiguous_format,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (N, H, W, 3) on any device -> normalised float32 (N, 3, size, size) there.

    `boxes` (N, 4) of (top, left, height, width): crop each image to its box before the
    resize (None: the whole image, as the evaluation's Resize). `flips` (N,) bool: mirror
    those images left-right. Resize: antialiased bilinear (torchvision's `Resize`,
    `antialias=True`); then x / 255, minus `mean`, over `std`, per channel. `rows`: take
    these images of `images` (a user's, on the device) as the batch, without copying them.
    `out`: a float32 (N, 3, size, size) tensor on the images' device to write the batch
    into (a buffer reused batch after batch; `memory_format` is then its own).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    picked = list(range(images.shape[0])) if rows is None else rows.tolist()
    shape = (len(picked), 3, size, size)
    if out is None:
        out = torch.empty(shape, device=images.device, memory_format=memory_format)
    elif out.shape != shape or out.dtype != torch.float32 or out.device != images.device:
        raise ValueError(
            f"out: expected float32 {shape} on {images.device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
    nchw = images.permute(0, 3, 1, 2)  # a view: channels-last strides, what the CPU kernel wants
    if boxes is None and flips is None and rows is None:
        out.copy_(_resize(_resizable(nchw), size))
        return _normalize_(out, mean, std)
    height, width = images.shape[1:3]
    crops = boxes.tolist() if boxes is not None else [(0, 0, height, width)] * len(picked)
    mirrored = flips.tolist() if flips is not None else [False] * len(picked)
    planar = out.is_contiguous()  # else channels-last: the resize's own layout, a plain cast
    write = _cpu_writer(out) if images.device.type == "cpu" and planar else _torch_writer(out)
    for n, (row, (top, left, h, w), flip) in enumerate(zip(picked, crops, mirrored, strict=True)):
        crop = nchw[row : row + 1, :, top : top + h, left : left + w]
        write(n, _resize(_resizable(crop), size)[0], flip)
    return _normalize_(out, mean, std)


def _cpu_writer(out: torch.Tensor) -> Callable[[int, torch.Tensor, bool], None]:
    """Writes one resized uint8 image (3, size, size) into slot n of a channel-planar float32
    batch, mirrored if asked: NumPy's cast-copy through a negative-stride view (torch has
    none), so the mirror costs no pass of its own, and the channels-last -> channel-planar
    cast (as costly as the resize itself) runs ~10% faster than torch's `copy_`. (Into a
    channels-last batch the same mirrored copy is 10x slower than torch's flip + copy_.)"""
    planes = out.numpy()

    def write(n: int, resized: torch.Tensor, flip: bool) -> None:
        pixels = resized.numpy()
        np.copyto(planes[n], pixels[:, :, ::-1] if flip else pixels, casting="unsafe")

    return write


def _torch_writer(out: torch.Tensor) -> Callable[[int, torch.Tensor, bool], None]:
    def write(n: int, resized: torch.Tensor, flip: bool) -> None:
        out[n].copy_(resized.flip(-1) if flip else resized)

    return write


def _resizable(images: torch.Tensor) -> torch.Tensor:
    """uint8 on CPU (PyTorch's vectorised uint8 kernel); float32 elsewhere (CUDA's
    antialiased kernel takes floating point only), converted crop by crop."""
    return images if images.device.type == "cpu" else images.float()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, size, size, 3): the evaluation's `Resize((size, size),
    antialias=True)`, done once and kept as pixels (flair_fl.data.eval_split). On the CPU,
    PyTorch's uint8 kernel (exactly torchvision's per-image result); elsewhere float32,
    rounded back to uint8."""
    resized = _resize(_resizable(images.permute(0, 3, 1, 2)), size)
    if resized.dtype != torch.uint8:
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return resized.permute(0, 2, 3, 1).contiguous()


def _normalize_(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """In place: (x / 255 - mean) / std as one multiply and one add per element.

    A channels-last batch is scaled as rows of `PATTERN` pixels (C * PATTERN interleaved
    values) against the constants repeated to match: broadcasting (1, C, 1, 1), or (C,) over
    its (N, H, W, C) view, runs an inner loop of C elements, ~10x slower on the CPU."""
    if images.is_contiguous() or not images.is_contiguous(memory_format=torch.channels_last):
        scale, shift = _affine(mean, std, images.device)
        return images.mul_(scale).add_(shift)
    repeat = math.gcd(images.numel() // len(mean), PATTERN)
    scale, shift = _affine(mean, std, images.device, repeat)
    rows = images.permute(0, 2, 3, 1).view(-1, len(mean) * repeat)  # the same memory
    rows.mul_(scale).add_(shift)
    return images


PATTERN = 64  # pixels per row of a channels-last batch's normalisation (see _normalize_)


@functools.lru_cache(maxsize=32)
def _affine(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, repeat: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), -mean / std) on `device`, made once: as (1, C, 1, 1) tensors, or
    `repeat` > 0: as (C * repeat,) tensors, the C values `repeat` times over."""
    scale = torch.tensor([1 / (255 * s) for s in std], device=device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device)
    if repeat:
        return scale.repeat(repeat), shift.repeat(repeat)
    shape = (1, len(mean), 1, 1)
    return scale.view(shape), shift.view(shape)


@dataclass(frozen=True)
class TrainAugment:
    """RandomResizedCrop(size) + RandomHorizontalFlip + scale + normalise, with each image's
    parameters drawn on its own (torchvision's distribution), applied to a whole batch."""

    size: int
    scale: tuple[float, float] = SCALE
    ratio: tuple[float, float] = RATIO
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator,
        memory_format: torch.memory_format = torch.contiguous_format,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float32 (N, 3, size, size) on the images' device.

        `rows`: augment these images of `images` (default: all). The random parameters come
        from `generator` (CPU), so a seed gives the same crops and flips on every device.
        """
        height, width = images.shape[1:3]
        count = images.shape[0] if rows is None else len(rows)
        boxes = sample_crop_boxes(count, height, width, generator, self.scale, self.ratio)
        flips = torch.rand(count, generator=generator) < 0.5
        return to_model_input(
            images, self.size, boxes, flips, self.mean, self.std, memory_format, rows
        )
