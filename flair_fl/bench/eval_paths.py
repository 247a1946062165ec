"""The two central-evaluation paths, for the data-path benchmark and the equality tests.

- `per_image`: the path flair-fl had before the in-memory one, kept as the baseline: every
  evaluation re-reads the split from HDF5 user by user (SplitDataset) and transforms each
  image on the CPU (torchvision v2 Resize(antialias=True), ToDtype, Normalize) in a
  DataLoader without workers, then moves the batch to the device.
- `in_memory`: `CentralEvaluator`'s path: the split read and resized once
  (`load_eval_split`), each evaluation normalising whole batches on the device.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from flair_fl.data.datasets import SplitDataset, build_transform
from flair_fl.data.eval_split import EvalImages, load_eval_split
from flair_fl.data.source import FederatedData
from flair_fl.learning.local_training import evaluate
from flair_fl.learning.metrics import MetricState


@torch.no_grad()
def per_image(
    model: torch.nn.Module,
    data: FederatedData,
    split: str,
    batch_size: int,
    device: torch.device,
) -> MetricState:
    """Evaluate as flair-fl did before: per-image CPU transforms over a fresh HDF5 read."""
    transform = build_transform(train=False, size=data.input_size)
    dataset = SplitDataset(
        data.reader, split, data.label_set, transform, label_index=data.label_index
    )
    model.to(device).eval()
    state = MetricState.zeros(data.num_labels)
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        state = state + MetricState.from_batch(model(images.to(device)), targets.to(device))
    return state


def load_in_memory(
    data: FederatedData, split: str, device: torch.device, placement: str = "auto"
) -> EvalImages:
    """The split as the in-memory path holds it (read and resized once)."""
    return load_eval_split(
        data.reader,
        split,
        data.label_set,
        data.input_size,
        device,
        data.num_labels,
        data.label_index,
        placement,
    )


def in_memory(
    model: torch.nn.Module,
    images: EvalImages,
    num_labels: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> MetricState:
    """One evaluation on the in-memory path (what CentralEvaluator runs)."""
    return evaluate(model, images, num_labels, batch_size, device, precision)
