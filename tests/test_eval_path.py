"""The in-memory evaluation path: its resize (done once) and normalisation against
torchvision's per-image transforms, and its metrics against the per-image path it replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from flair_fl.bench.eval_paths import in_memory, load_in_memory, per_image
from flair_fl.data.augment import IMAGENET_MEAN, IMAGENET_STD, resize_uint8, to_model_input
from flair_fl.data.datasets import build_transform
from flair_fl.data.source import FederatedData
from flair_fl.learning.evaluator import CentralEvaluator, overlap_enabled
from flair_fl.models.small_cnn import small_cnn

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _photos(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, size, size, 3): smooth gradients plus noise (photo-like) and pure noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    smooth = (ramp[None, :, None] + ramp[:, None, None]) / 2 * np.ones((1, 1, 3))
    images = np.clip(smooth[None] + rng.normal(0, 20, (n, size, size, 3)), 0, 255)
    images[n // 2 :] = rng.integers(0, 256, (n - n // 2, size, size, 3))
    return torch.from_numpy(images.astype(np.uint8))


def _per_image_resize(images_nhwc: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's Resize image by image, back in the (N, H, W, 3) layout."""
    transform = v2.Resize((size, size), antialias=True)
    per_image = [transform(image.permute(2, 0, 1).contiguous()) for image in images_nhwc]
    return torch.stack(per_image).permute(0, 2, 3, 1)


@pytest.mark.parametrize(("stored", "size"), [(256, 224), (32, 24), (16, 24), (24, 24)])
def test_batched_resize_equals_torchvision_per_image(stored: int, size: int) -> None:
    """On the CPU the batched resize (channels-last view, one call) is bit-identical to
    Resize((size, size), antialias=True) image by image."""
    images = _photos(6, stored)

    got = resize_uint8(images, size)

    assert got.dtype == torch.uint8 and got.is_contiguous() and got.shape == (6, size, size, 3)
    assert torch.equal(got, _per_image_resize(images, size))


def test_float_resize_kernel_is_within_one_grey_level() -> None:
    """What CUDA runs (float32 antialiased resize, rounded) against the CPU's uint8 kernel:
    at most 1 grey level apart, without bias (the share that differs is printed: the README
    cites it)."""
    images = _photos(8, 256)
    cpu = _per_image_resize(images, 224).permute(0, 3, 1, 2).int()
    as_float = images.permute(0, 3, 1, 2).float()

    rounded = torch.nn.functional.interpolate(
        as_float, size=(224, 224), mode="bilinear", antialias=True, align_corners=False
    ).round_()

    signed = rounded.clamp(0, 255).int() - cpu
    diff = signed.abs()
    share = float((diff > 0).float().mean())
    print(f"float vs uint8 resize kernel: max {int(diff.max())} grey level, {share:.2%} of pixels")
    print(f"mean signed difference {float(signed.float().mean()):+.4f}")
    assert int(diff.max()) <= 1


def test_normalisation_equals_torchvision_transforms() -> None:
    """What each evaluation does to the held images (already at the input size)."""
    images = _photos(4, 24)
    expected = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )

    got = to_model_input(images, 24)

    want = torch.stack([expected(image.permute(2, 0, 1)) for image in images])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # one fused multiply-add


def test_resized_split_equals_the_per_image_eval_transform(tiny_hdf5: Path) -> None:
    """The split held in memory is exactly what the old per-image transform fed the model."""
    data = FederatedData(tiny_hdf5, input_size=24)
    transform = build_transform(train=False, size=24)

    held = load_in_memory(data, "val", torch.device("cpu"))

    first_user = next(iter(data.reader.population("val")))
    user = data.reader.read_user("val", first_user)
    chw = torch.from_numpy(user.images).permute(0, 3, 1, 2)
    expected = torch.stack([transform(image) for image in chw])
    assert len(held) == sum(data.reader.population("val").values())
    got = to_model_input(held.images[: len(user.images)], 24)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(held.targets[: len(user.images)], torch.from_numpy(user.targets))


@pytest.mark.parametrize("binary_label", [None, "animal"])
def test_in_memory_metrics_equal_the_per_image_path(
    tiny_hdf5: Path, binary_label: str | None
) -> None:
    """Metrics of the in-memory path equal the per-image path's within 1e-4 (resize 32 -> 24
    px, several batches, and ml-flair's binary mode)."""
    data = FederatedData(tiny_hdf5, input_size=24, binary_label=binary_label)
    torch.manual_seed(0)
    model = small_cnn(num_classes=data.num_labels, width=8)
    cpu = torch.device("cpu")

    old = per_image(model, data, "val", 16, cpu).compute()
    new = in_memory(model, load_in_memory(data, "val", cpu), data.num_labels, 16, cpu).compute()

    assert old.keys() == new.keys()
    for key in old:
        assert new[key] == pytest.approx(old[key], abs=1e-4), key


def test_cpu_batches_are_written_into_one_reused_buffer(tiny_hdf5: Path) -> None:
    """On the CPU each evaluation batch goes into one float buffer kept with the split (a
    fresh one per batch costs first-touch page faults); every batch, the short last one
    included, equals a freshly normalised one, and the next evaluation reuses the buffer."""
    cpu = torch.device("cpu")
    held = load_in_memory(FederatedData(tiny_hdf5, input_size=24), "val", cpu)
    batch = 3
    assert len(held) > batch and len(held) % batch  # several batches, the last one short

    pointers = []
    starts = range(0, len(held), batch)
    for start, (inputs, targets) in zip(starts, held.inputs(batch, cpu), strict=True):
        want = to_model_input(held.images[start : start + batch], 24)
        assert torch.equal(inputs, want)
        assert torch.equal(targets, held.targets[start : start + batch])
        pointers.append(inputs.data_ptr())
    again = [inputs.data_ptr() for inputs, _ in held.inputs(batch, cpu)]

    assert len(pointers) == len(starts) and set(pointers) == {pointers[0]}
    assert again == pointers


def test_model_input_into_a_given_buffer_checks_it() -> None:
    images = _photos(2, 24)
    out = torch.empty(2, 3, 24, 24)

    got = to_model_input(images, 24, out=out)

    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, to_model_input(images, 24), rtol=0, atol=0)
    with pytest.raises(ValueError, match="out: expected float32"):
        to_model_input(images, 24, out=torch.empty(3, 3, 24, 24))
    with pytest.raises(ValueError, match="out: expected float32"):
        to_model_input(images, 24, out=torch.empty(2, 3, 24, 24, dtype=torch.float64))


def test_central_evaluator_reads_each_split_once(tiny_hdf5: Path) -> None:
    data = FederatedData(tiny_hdf5, input_size=24)
    model = small_cnn(num_classes=data.num_labels, width=8)
    evaluator = CentralEvaluator(model, data, 32, torch.device("cpu"))
    from flwr.app import ArrayRecord

    from flair_fl.models.params import trainable_state

    arrays = ArrayRecord(trainable_state(model))
    first = evaluator(arrays, "val")
    held = evaluator.splits["val"]
    second = evaluator(arrays, "val")

    assert evaluator.splits["val"] is held and first == second
    assert first["val_num_images"] == len(held) and "test" not in evaluator.splits


def test_bf16_evaluation_stays_close_to_fp32(tiny_hdf5: Path) -> None:
    data = FederatedData(tiny_hdf5, input_size=24)
    torch.manual_seed(0)
    model = small_cnn(num_classes=data.num_labels, width=8)
    cpu = torch.device("cpu")
    held = load_in_memory(data, "val", cpu)

    fp32 = in_memory(model, held, data.num_labels, 64, cpu).compute()
    bf16 = in_memory(model, held, data.num_labels, 64, cpu, precision="bf16").compute()

    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02)
    assert bf16["macro_ap"] == pytest.approx(fp32["macro_ap"], abs=0.05)


def test_overlap_setting() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not overlap_enabled("auto", cpu) and overlap_enabled("auto", cuda)
    assert overlap_enabled(True, cpu) and not overlap_enabled("false", cuda)
    with pytest.raises(ValueError, match=r"eval\.overlap"):
        overlap_enabled("sometimes", cpu)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("placement", ["device", "host"])
def test_gpu_eval_path_matches_the_per_image_path(tiny_hdf5: Path, placement: str) -> None:
    """On CUDA: the split is held on the GPU or pinned, as asked, with the CPU's resized
    pixels, and its metrics equal the per-image path's on the same GPU within 1e-4."""
    data = FederatedData(tiny_hdf5, input_size=24)
    torch.manual_seed(0)
    model = small_cnn(num_classes=data.num_labels, width=8)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    on_gpu = load_in_memory(data, "val", cuda, placement)

    assert (on_gpu.images.device.type == "cuda") == (placement == "device")
    assert placement == "device" or on_gpu.images.is_pinned()
    assert torch.equal(on_gpu.images.cpu(), load_in_memory(data, "val", cpu).images)
    old = per_image(model, data, "val", 64, cuda).compute()
    new = in_memory(model, on_gpu, data.num_labels, 64, cuda).compute()
    for key in old:
        assert new[key] == pytest.approx(old[key], abs=1e-4), key
    bf16 = in_memory(model, on_gpu, data.num_labels, 64, cuda, precision="bf16").compute()
    assert bf16["loss"] == pytest.approx(old["loss"], rel=0.02)


@pytest.mark.gpu
@CUDA
def test_gpu_resize_kernel_is_within_one_grey_level_of_the_cpu() -> None:
    """torchvision's CUDA resize (float32, rounded) against its CPU uint8 kernel."""
    images = _photos(8, 256)

    on_gpu = resize_uint8(images.cuda(), 224).cpu().int()

    diff = (on_gpu - resize_uint8(images, 224).int()).abs()
    print(f"CUDA vs CPU resize: max {int(diff.max())}, {float((diff > 0).float().mean()):.2%}")
    assert int(diff.max()) <= 1
