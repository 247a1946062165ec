"""Batched augmentation (flair_fl.data.augment) against torchvision's per-image transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from flair_fl.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainAugment,
    sample_crop_boxes,
    to_model_input,
)

DRAWS = 10_000
KS_CRITICAL = 1.95  # two-sample KS at alpha = 0.001: D > 1.95 * sqrt((n + m) / (n m)) rejects


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_rejects(a: np.ndarray, b: np.ndarray) -> bool:
    return ks_statistic(a, b) > KS_CRITICAL * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def box_features(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    """What RandomResizedCrop draws: area fraction, log aspect ratio, relative position."""
    top, left, h, w = boxes.T.astype(np.float64)
    movable = (h < height) & (w < width)  # a box filling a side has no position to draw
    return {
        "scale": h * w / (height * width),
        "log_ratio": np.log(w / h),
        "top": top[movable] / (height - h[movable]),
        "left": left[movable] / (width - w[movable]),
    }


def torchvision_boxes(
    height: int, width: int, count: int, scale: tuple[float, float]
) -> np.ndarray:
    torch.manual_seed(1)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    ratio = [3 / 4, 4 / 3]
    return np.array([RandomResizedCrop.get_params(image, list(scale), ratio) for _ in range(count)])


@pytest.mark.parametrize(("height", "width"), [(256, 256), (60, 300)])  # 60 x 300: fallbacks
def test_crop_boxes_have_torchvision_distribution(height: int, width: int) -> None:
    # Prepare
    want = torchvision_boxes(height, width, DRAWS, (0.08, 1.0))

    # Execute
    got = sample_crop_boxes(DRAWS, height, width, torch.Generator().manual_seed(0)).numpy()

    # Assert: every drawn quantity has torchvision's distribution (KS, alpha = 0.001)...
    ours, theirs = box_features(got, height, width), box_features(want, height, width)
    for name in ours:
        assert not ks_rejects(ours[name], theirs[name]), name
    # ... boxes lie inside the image, and the central fallback is taken as often, same box
    assert (got[:, 0] + got[:, 2] <= height).all() and (got[:, 1] + got[:, 3] <= width).all()
    if width > height:  # the fallback: full height, the widest allowed ratio, centred
        central = np.array([0, (width - round(height * 4 / 3)) // 2, height, round(height * 4 / 3)])
        rate, rate_want = (got == central).all(1).mean(), (want == central).all(1).mean()
        assert rate > 0.05 and abs(rate - rate_want) < 0.015


def test_ks_check_detects_a_different_scale_range() -> None:
    # Prepare: torchvision drawing from scale (0.15, 1) instead of the default (0.08, 1)
    shifted = box_features(torchvision_boxes(256, 256, DRAWS, (0.15, 1.0)), 256, 256)

    # Execute
    ours = box_features(
        sample_crop_boxes(DRAWS, 256, 256, torch.Generator().manual_seed(0)).numpy(), 256, 256
    )

    # Assert: the statistical check above has the power to see such a difference
    assert ks_rejects(ours["scale"], shifted["scale"])


def torchvision_pipeline(
    image: torch.Tensor, box: list[int], flip: bool, size: int
) -> torch.Tensor:
    """The per-image path: crop + antialiased resize on uint8, flip, scale, normalise."""
    out = TF.resized_crop(image, *box, [size, size], antialias=True)
    if flip:
        out = TF.horizontal_flip(out)
    out = TF.to_dtype(out, torch.float32, scale=True)
    return TF.normalize(out, list(IMAGENET_MEAN), list(IMAGENET_STD))


def noisy_images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=g)


def test_batched_crop_equals_torchvision_resized_crop() -> None:
    # Prepare: boxes smaller than the output (upscale), larger (downscale, antialiased),
    # equal to it, and the whole image; half of them flipped
    images = noisy_images(6, 64, 80)
    boxes = torch.tensor(
        [
            [0, 0, 64, 80],
            [5, 7, 20, 31],
            [10, 3, 50, 60],
            [0, 40, 32, 32],
            [30, 0, 34, 9],
            [1, 2, 63, 77],
        ]
    )
    flips = torch.tensor([False, True, False, True, True, False])

    # Execute
    got = to_model_input(images, 32, boxes, flips)

    # Assert: the same kernel on the same uint8 pixels; only the normalisation's float
    # rounding differs (one fused multiply-add instead of a subtract and a divide)
    for n in range(len(images)):
        want = torchvision_pipeline(
            images[n].permute(2, 0, 1), boxes[n].tolist(), bool(flips[n]), 32
        )
        torch.testing.assert_close(got[n], want, atol=1e-5, rtol=0)


def test_whole_image_resize_equals_torchvision_resize() -> None:
    # Prepare
    images = noisy_images(4, 48, 48)

    # Execute
    got = to_model_input(images, 20)

    # Assert
    for n in range(len(images)):
        want = TF.resize(images[n].permute(2, 0, 1), [20, 20], antialias=True)
        want = TF.normalize(
            TF.to_dtype(want, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD
        )
        torch.testing.assert_close(got[n], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [24, 25])  # 25 * 25 pixels: no 64-pixel normalisation rows
def test_channels_last_output_has_the_same_values(size: int) -> None:
    # Prepare
    images, augment = noisy_images(3, 40, 40), TrainAugment(size)

    # Execute
    plain = augment(images, torch.Generator().manual_seed(4))
    nhwc = augment(images, torch.Generator().manual_seed(4), torch.channels_last)

    # Assert
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    assert torch.equal(plain, nhwc)


def test_same_seed_same_augmentation_and_every_image_its_own() -> None:
    # Prepare: eight copies of one image
    images = noisy_images(1, 64, 64).expand(8, -1, -1, -1)
    augment = TrainAugment(32)

    # Execute
    first = augment(images, torch.Generator().manual_seed(7))
    again = augment(images, torch.Generator().manual_seed(7))
    other = augment(images, torch.Generator().manual_seed(8))

    # Assert: reproducible, seed-dependent, and drawn per image (not one crop per batch)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert all(not torch.equal(first[0], first[n]) for n in range(1, 8))
    assert first.shape == (8, 3, 32, 32) and first.dtype == torch.float32


def test_flips_half_the_images() -> None:
    # Prepare: a ramp, brighter to the right; crops keep that unless mirrored
    ramp = (torch.arange(64) * 4).to(torch.uint8)
    images = ramp.view(1, 1, 64, 1).expand(400, 64, 64, 3).contiguous()

    # Execute
    out = TrainAugment(16)(images, torch.Generator().manual_seed(0))

    # Assert: Binomial(400, 0.5) lies in [150, 250] except with probability ~1e-6
    mirrored = int((out[:, 0, :, 0].mean(1) > out[:, 0, :, -1].mean(1)).sum())
    assert 150 <= mirrored <= 250


def test_mirrored_image_is_the_unmirrored_one_flipped_exactly() -> None:
    # Prepare: each box twice, once mirrored; channels-last output too (the CPU path
    # mirrors while casting, through a negative-stride view)
    images = noisy_images(3, 50, 70)
    boxes = torch.tensor([[0, 0, 50, 70], [4, 9, 30, 41], [10, 20, 32, 32]]).repeat(2, 1)
    flips = torch.tensor([False] * 3 + [True] * 3)
    rows = torch.tensor([0, 1, 2, 0, 1, 2])

    for memory_format in (torch.contiguous_format, torch.channels_last):
        # Execute
        out = to_model_input(images, 32, boxes, flips, memory_format=memory_format, rows=rows)

        # Assert
        assert torch.equal(out[3:], out[:3].flip(-1))
        assert not torch.equal(out[3:], out[:3])


def test_empty_batch_and_bad_input() -> None:
    # Prepare
    augment = TrainAugment(16)

    # Execute
    empty = augment(torch.zeros(0, 32, 32, 3, dtype=torch.uint8), torch.Generator())

    # Assert
    assert empty.shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(torch.zeros(2, 3, 32, 32), 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_augmentation_matches_cpu_within_half_a_grey_level() -> None:
    # Prepare
    images, augment = noisy_images(16, 256, 256), TrainAugment(224)

    # Execute
    cpu = augment(images, torch.Generator().manual_seed(3))
    cuda = augment(images.cuda(), torch.Generator().manual_seed(3)).cpu()

    # Assert: same boxes and flips; CUDA's float resize is not rounded to uint8, so it is
    # within 0.5/255 (before normalising) of the CPU's (torchvision's) uint8 result
    tolerance = 0.5 / 255 / min(IMAGENET_STD) + 1e-5
    torch.testing.assert_close(cuda, cpu, atol=tolerance, rtol=0)
