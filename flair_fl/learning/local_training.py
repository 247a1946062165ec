"""Local training and evaluation loops in plain PyTorch (no Flower, no data formats).

The federated client, the centralized baseline and the benchmark reference all call these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from flair_fl.data.datasets import TrainImages, collate_batch
from flair_fl.data.eval_split import EvalImages
from flair_fl.learning.metrics import MetricState

# Turns what the loader yields into the model's input on the device, in a memory format
# (TrainImages.inputs: a batch of image indices -> the augmented batch).
BatchInputs = Callable[[torch.Tensor, torch.memory_format], torch.Tensor]


@dataclass(frozen=True)
class LocalTraining:
    """One client's local optimisation settings."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.0
    grad_clip: float | None = 10.0  # max L2 norm of each step's gradient; None disables
    # FedProx: adds mu/2 * ||w - w_global||^2 to the loss. A federated client takes mu from
    # each round's message (the strategy's `proximal-mu`), never from its spec.
    proximal_mu: float = 0.0
    precision: str = "fp32"  # fp32 | bf16: autocast forward/backward in bfloat16 (weights fp32)
    channels_last: bool = False  # NHWC memory format (faster convolutions on tensor cores)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"client.precision={self.precision!r}: expected fp32 or bf16")


def train_local(
    model: nn.Module,
    dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
    settings: LocalTraining,
    device: torch.device,
    generator: torch.Generator,
    grad_correction: dict[str, torch.Tensor] | None = None,
    inputs: BatchInputs | None = None,
) -> dict[str, float]:
    """Train `model` in place with SGD on `dataset`; returns mean loss and counts.

    `generator` fixes the data order (the caller seeds it per seed, round and user).
    `grad_correction` (by parameter name) is added to every step's clipped gradient
    (SCAFFOLD's c - c_i). `inputs` maps each loaded batch to the model's input (default:
    the batch is the input, moved to `device`).
    """
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model.to(device).train()
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    corrections = [grad_correction[n].to(device) for n, _ in named] if grad_correction else []
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    global_params = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=settings.precision == "bf16")
    loss_sum, seen, steps = torch.zeros((), device=device), 0, 0  # summed on the device: no
    for _ in range(settings.epochs):  # host sync per step
        for batch, targets in epoch_batches(dataset, settings.batch_size, generator):
            images = batch_input(batch, device, memory_format, inputs)
            targets = targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = model(images)
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
            total = loss
            if global_params:
                total = loss + settings.proximal_mu / 2 * sum(
                    torch.sum((p - g) ** 2) for p, g in zip(params, global_params, strict=True)
                )
            total.backward()
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            for p, correction in zip(params, corrections, strict=False):
                p.grad.add_(correction)  # type: ignore[union-attr]
            optimizer.step()
            loss_sum += loss.detach() * len(images)
            seen += len(images)
            steps += 1
    return {
        "train_loss": float(loss_sum) / max(seen, 1),
        "num_examples": float(len(dataset)),  # type: ignore[arg-type]
        "num_steps": float(steps),
    }


def epoch_batches(
    dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled batches: exactly those, in the order and with the random draws,
    of `DataLoader(dataset, batch_size, shuffle=True, generator=generator)`
    (tests/test_train_path.py holds them equal), without its per-epoch iterator, which
    costs a user of a few images as much as its HDF5 read. A TrainImages hands over each
    batch whole (`batch`); any other dataset is collated item by item."""
    n = len(dataset)  # type: ignore[arg-type]
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the iterator's base seed
    order = torch.randperm(n, generator=generator)  # RandomSampler's permutation
    torch.randperm(n, generator=generator)  # and the one it draws for the (empty) remainder
    for index in order.split(batch_size):
        if isinstance(dataset, TrainImages):
            yield dataset.batch(index)
        else:
            yield default_collate([dataset[i] for i in index.tolist()])


def batch_loader(
    dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    generator: torch.Generator,
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """A sequential DataLoader over `dataset`, for Opacus to turn into its Poisson loader
    (DP-SGD): a TrainImages hands over each batch whole, any other dataset is collated item
    by item."""
    collate = collate_batch if isinstance(dataset, TrainImages) else None
    return DataLoader(dataset, batch_size=batch_size, generator=generator, collate_fn=collate)


def batch_input(
    batch: torch.Tensor,
    device: torch.device,
    memory_format: torch.memory_format,
    inputs: BatchInputs | None,
) -> torch.Tensor:
    """The model's input for one loaded batch, on `device`."""
    if inputs is not None:
        return inputs(batch, memory_format)
    return batch.to(device, non_blocking=True, memory_format=memory_format)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: EvalImages,
    num_labels: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> MetricState:
    """FLAIR metric statistics of `model` over uint8 images already at the input size
    (sequential batches, normalised on `device`; `precision=bf16`: bfloat16 autocast)."""
    model.to(device).eval()
    state = MetricState.zeros(num_labels)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")
    for inputs, targets in data.inputs(batch_size, device):
        with autocast:
            logits = model(inputs)
        state = state + MetricState.from_batch(logits, targets)
    return state
