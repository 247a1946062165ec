"""Centralized baseline (ml-flair's C-* rows): train on the pooled train users, no FL.

Same data, models, metrics, loggers and summary as federated runs, so C-* and FL-* results
come out of one tool. Each epoch streams the train split user block by user block (HDF5
reads stay sequential) through a seeded shuffle buffer of uint8 images; each batch is
augmented on the training device as federated clients do (flair_fl.data.augment).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from flair_fl.artifacts.durable import write_atomically
from flair_fl.data.augment import TrainAugment
from flair_fl.data.hdf5 import FlairReader, LabelSet
from flair_fl.data.source import FederatedData, check_label
from flair_fl.errors import ConfigError
from flair_fl.federated.callbacks import BestModel, CentralEval, LogRounds, RoundTracker
from flair_fl.federated.round import LoopOutcome
from flair_fl.models.params import trainable_state
from flair_fl.modes.build import (
    build,
    build_loggers,
    central_evaluator,
    device_for,
    make_model,
)
from flair_fl.modes.config_checks import validate_run_config
from flair_fl.privacy import NoPrivacy
from flair_fl.services.seeds import derive_seed


class ShuffledSplit(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """A split's images (uint8 H x W x 3) in a seeded order: users shuffled, then a shuffle
    buffer."""

    def __init__(
        self,
        reader: FlairReader,
        split: str,
        label_set: LabelSet,
        label_index: int | None,
        buffer_images: int,
        seed: int,
    ):
        self.reader, self.split, self.label_set = reader, split, label_set
        self.label_index = label_index
        self.buffer_images, self.seed = buffer_images, seed
        self.users = list(reader.population(split))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng(self.seed)
        buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        for u in rng.permutation(len(self.users)):
            data = self.reader.read_user(self.split, self.users[u], self.label_set)
            targets = torch.from_numpy(data.targets)
            if self.label_index is not None:
                targets = targets[:, [self.label_index]]
            buffer.extend(zip(torch.from_numpy(data.images), targets, strict=True))
            if len(buffer) >= self.buffer_images:
                yield from self._drain(buffer, rng, keep=self.buffer_images // 2)
        yield from self._drain(buffer, rng, keep=0)

    def _drain(
        self, buffer: list[tuple[torch.Tensor, torch.Tensor]], rng: np.random.Generator, keep: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = rng.permutation(len(buffer))
        emit, rest = order[: len(buffer) - keep], order[len(buffer) - keep :]
        out = [buffer[i] for i in emit]
        buffer[:] = [buffer[i] for i in rest]
        yield from out


def run_central(
    cfg: DictConfig,
    output_dir: str | Path,
    epochs: int = 10,
    batch_size: int = 512,
    shuffle_buffer: int = 4096,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    grad_clip: float | None = None,
    clip_per_tensor: bool = False,
) -> dict[str, Any]:
    """Train centrally for `epochs`; evaluate on val every `eval_every` epochs."""
    # 1. run dir and config checks; no differential privacy in this mode
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    validate_run_config(cfg)
    if not isinstance(build(cfg.privacy, "privacy"), NoPrivacy):
        raise ConfigError(
            "mode=central trains without differential privacy; use privacy=none "
            "(DP applies to federated runs)"
        )
    # 2. data, model (seeded), central evaluation, loggers, the untrained model's val
    data: FederatedData = build(cfg.data, "data")
    data.require_splits("train", "val", *(["test"] if cfg.eval.test_at_end else []))
    check_label(data)
    write_atomically(out / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(derive_seed(cfg.seed, "model-init"))
    model = make_model(cfg, data.num_labels)
    device = device_for(cfg.device)
    evaluator = central_evaluator(cfg, model, data, device)
    loggers = build_loggers(cfg, out)
    initial_val = evaluator(ArrayRecord(trainable_state(model)), "val")
    for logger in loggers:
        logger.log_untrained(initial_val)
    print(
        f"flair-fl central: {sum(data.reader.population('train').values())} train images, "
        f"{epochs} epochs, batch {batch_size}; untrained val macro AP "
        f"{initial_val['val_macro_ap']:.4f}",
        flush=True,
    )
    # 3. after-epoch work: evaluation every eval_every epochs, best model, loggers
    started = time.perf_counter()
    tracker = RoundTracker(
        CentralEval(evaluator, cfg.eval_every, epochs),
        [
            BestModel(evaluator, out, test_at_end=cfg.eval.test_at_end),
            LogRounds(loggers, epochs, started, unit="epoch"),
        ],
        initial_val,
        out,
        started,
        test_at_end=cfg.eval.test_at_end,
    )
    # 4. the epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (optimizer or torch.optim.Adam)(params)
    train = _Epoch(data, model, device, opt, params, batch_size, shuffle_buffer, cfg.seed)
    for epoch in range(1, epochs + 1):
        metrics = train(epoch, grad_clip, clip_per_tensor)
        tracker.after_round(epoch, ArrayRecord(trainable_state(model)), metrics)
    # 5. final and test evaluation, summary
    return tracker.finish(
        LoopOutcome(arrays=ArrayRecord(trainable_state(model)), rounds_done=epochs)
    )


class _Epoch:
    """One epoch of central training: the train split streamed in a seeded order, each
    batch augmented on the training device."""

    def __init__(
        self,
        data: FederatedData,
        model: torch.nn.Module,
        device: torch.device,
        opt: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
    ):
        self.data, self.model, self.device, self.opt, self.params = data, model, device, opt, params
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.augment = TrainAugment(data.input_size)

    def __call__(
        self, epoch: int, grad_clip: float | None, clip_per_tensor: bool
    ) -> dict[str, float]:
        started = time.perf_counter()
        data, model, device, opt, params = self.data, self.model, self.device, self.opt, self.params
        stream = ShuffledSplit(
            data.reader,
            "train",
            data.label_set,
            data.label_index,
            self.shuffle_buffer,
            derive_seed(self.seed, "central-epoch", epoch),
        )
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "central-augment", epoch))
        model.to(device).train()
        loss_sum, seen = 0.0, 0
        for batch, labels in DataLoader(stream, batch_size=self.batch_size):
            images, targets = self.augment(batch.to(device), generator), labels.to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(model(images), targets)
            loss.backward()
            if grad_clip is not None:  # per tensor is Keras's `clipnorm` (ml-flair's)
                for group in [[p] for p in params] if clip_per_tensor else [params]:
                    torch.nn.utils.clip_grad_norm_(group, grad_clip)
            opt.step()
            loss_sum, seen = loss_sum + loss.item() * len(images), seen + len(images)
        return {
            "train_loss": loss_sum / max(seen, 1),
            "round_time_s": time.perf_counter() - started,
        }
