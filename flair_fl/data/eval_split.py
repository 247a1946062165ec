"""An evaluation split held in memory, resized once: uint8 at the model's input size.

Central evaluation reads a split (val, and test at the end) once per run, user block by user
block in file order, resizes it in large batches and keeps the resized uint8 images: the
eval geometry is deterministic, so resizing once gives the very pixels a per-evaluation
resize would, and each evaluation only normalises and runs the model, on the device.

The one-time resize runs on the CPU, with PyTorch's uint8 kernel: bit-identical to the
per-image `Resize(antialias=True)` flair-fl used before (and to the CPU training path).
CUDA's float kernel is within 1 grey level of it, but differs in ~20% of pixels, and the
200-threshold AP of a barely trained model (near-equal scores) moves by up to ~3e-3 with
it (tests/test_eval_path.py); done once per run, the CPU resize costs little.
Where the images live (`placement`): `device` (the GPU), `host` (pinned host memory when the
evaluation runs on CUDA, so copies overlap with compute) or `auto` (the GPU when the split
takes at most a quarter of its memory and half of what is free, else pinned host memory).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from flair_fl.data.augment import resize_uint8, to_model_input
from flair_fl.data.hdf5 import FlairReader, LabelSet
from flair_fl.data.hdf5_layouts import UserData

log = logging.getLogger(__name__)
PLACEMENTS = ("auto", "device", "host")
RESIZE_CHUNK = 512  # images resized per call: large batches, bounded temporary memory


@dataclass
class EvalImages:
    """uint8 images (N, S, S, 3), as stored but at the input size, and float32 targets
    (N, L), on one device."""

    images: torch.Tensor
    targets: torch.Tensor
    # The CPU's reused input batch (see `inputs`).
    _buffer: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.images)

    def batches(
        self, batch_size: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive batches moved to `device` (asynchronously from pinned memory)."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield (
                self.images[start:stop].to(device, non_blocking=True),
                self.targets[start:stop].to(device, non_blocking=True),
            )

    def inputs(
        self, batch_size: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive batches as the model takes them: normalised float32 (B, 3, S, S) and
        the targets, on `device`.

        On the CPU every batch is written into one float buffer kept with the split (for the
        next evaluation too), so a batch is only valid until the next one is asked for. A
        fresh tensor per batch (300 MB at batch 512, 224 px) costs more in first-touch page
        faults than the conversion itself: measured on a 2-core CPU, 0.9 ms per image fresh
        against 0.2 ms reused. (On CUDA, the caching allocator already reuses the memory.)
        One evaluation of a split at a time (CentralEvaluator's are: they share its model).
        """
        size = self.images.shape[1]
        for images, targets in self.batches(batch_size, device):
            out = self._reused(len(images), batch_size, size) if device.type == "cpu" else None
            yield to_model_input(images, size, out=out), targets

    def _reused(self, count: int, batch_size: int, size: int) -> torch.Tensor:
        shape = (min(batch_size, len(self)), 3, size, size)
        if self._buffer is None or self._buffer.shape != shape:
            self._buffer = torch.empty(shape)
        return self._buffer[:count]

    @classmethod
    def from_user(
        cls, data: UserData, size: int, device: torch.device, label_index: int | None = None
    ) -> EvalImages:
        """One user's images, resized (on the CPU, as `load_eval_split`) and moved to
        `device`: a client's federated evaluation."""
        targets = torch.from_numpy(_targets(data.targets, label_index))
        images = resize_uint8(torch.from_numpy(np.ascontiguousarray(data.images)), size)
        return cls(images.to(device), targets.to(device))


def _targets(targets: np.ndarray, label_index: int | None) -> np.ndarray:
    # Binary mode (ml-flair): one label's column is the only target.
    return targets if label_index is None else targets[:, [label_index]]


def _on_device(nbytes: int, placement: str, device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # on the CPU, host memory is the device's
    if placement != "auto":
        return placement == "device"
        return True
    free, total = torch.cuda.mem_get_info(device)
    return nbytes <= min(total / 4, free / 2)


def _allocate(
    shape: tuple[int, ...], dtype: torch.dtype, on_device: bool, device: torch.device
) -> torch.Tensor:
    if on_device:
        return torch.empty(shape, dtype=dtype, device=device)
    pin = device.type == "cuda"
    try:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    except RuntimeError as err:  # pinning many GB can fail (locked-memory limits)
        log.warning("eval split: pinned host memory unavailable (%s); using pageable memory", err)
        return torch.empty(shape, dtype=dtype)


def load_eval_split(
    reader: FlairReader,
    split: str,
    label_set: LabelSet,
    size: int,
    device: torch.device,
    num_labels: int,
    label_index: int | None = None,
    placement: str = "auto",
) -> EvalImages:
    """Read every image of `split` once, resize it to `size`, keep it uint8 on `device` or
    in (pinned) host memory, as `placement` says."""
    if placement not in PLACEMENTS:
        raise ValueError(f"eval.data_on={placement!r}: expected one of {', '.join(PLACEMENTS)}")
    population = reader.population(split)
    total = sum(population.values())
    on_device = _on_device(total * 3 * size * size + total * num_labels * 4, placement, device)
    images = _allocate((total, size, size, 3), torch.uint8, on_device, device)
    targets = _allocate((total, num_labels), torch.float32, on_device, device)
    filled = 0
    pending: list[UserData] = []

    def flush() -> None:
        nonlocal filled
        pixels = np.concatenate([d.images for d in pending])
        resized = resize_uint8(torch.from_numpy(pixels), size)
        labels = np.concatenate([_targets(d.targets, label_index) for d in pending])
        n = len(resized)
        images[filled : filled + n].copy_(resized, non_blocking=True)
        targets[filled : filled + n].copy_(torch.from_numpy(labels), non_blocking=True)
        filled += n
        pending.clear()

    for user in population:
        data = reader.read_user(split, user, label_set)
        if pending and data.images.shape[1:] != pending[0].images.shape[1:]:
            flush()  # users' stored sizes may differ; a chunk is resized in one call
        pending.append(data)
        if sum(len(d.images) for d in pending) >= RESIZE_CHUNK:
            flush()
    if pending:
        flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # every copy done before other streams read them
    return EvalImages(images[:filled], targets[:filled])
