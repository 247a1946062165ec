"""Central evaluation in the driver: a split read once into memory, evaluated in batches.

Federated runs, the centralized baseline and the benchmarks all evaluate through
`CentralEvaluator`. Each split is read and resized once per run (flair_fl.data.eval_split);
each evaluation then normalises and runs the model on `device`, in batches of `batch_size`.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any

import torch
from flwr.app import ArrayRecord

from flair_fl.data.eval_split import EvalImages, load_eval_split
from flair_fl.data.source import FederatedData
from flair_fl.learning.local_training import evaluate
from flair_fl.learning.metrics import MetricState
from flair_fl.models.params import load_trainable

log = logging.getLogger(__name__)
OVERLAP = ("auto", "true", "false")


def overlap_enabled(setting: Any, device: torch.device) -> bool:
    """`eval.overlap`: true, false or auto (on when the driver evaluates on a GPU; on a CPU
    the clients already use every core, so evaluating beside them only slows them down)."""
    value = str(setting).lower()
    if value not in OVERLAP:
        raise ValueError(f"eval.overlap={setting!r}: expected one of {', '.join(OVERLAP)}")
    return device.type == "cuda" if value == "auto" else value == "true"


class CentralEvaluator:
    """Evaluates global weights on a whole split in the driver."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: FederatedData,
        batch_size: int,
        device: torch.device,
        precision: str = "fp32",
        placement: str = "auto",
    ):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"eval.precision={precision!r}: expected fp32 or bf16")
        self.model, self.data, self.batch_size, self.device = model, data, batch_size, device
        self.precision, self.placement = precision, placement
        self.splits: dict[str, EvalImages] = {}
        # Its own stream: a background evaluation does not queue behind the driver's other
        # GPU work. (Clients are other processes; the GPU time-slices between those.)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def images(self, split: str) -> EvalImages:
        """The split's resized uint8 images, read on first use and kept for the run."""
        if split not in self.splits:
            started = time.perf_counter()
            self.splits[split] = load_eval_split(
                self.data.reader,
                split,
                self.data.label_set,
                self.data.input_size,
                self.device,
                self.data.num_labels,
                self.data.label_index,
                self.placement,
            )
            images = self.splits[split].images
            log.info(
                "central evaluation: %s split (%d images) read in %.1f s, held on %s",
                split,
                len(images),
                time.perf_counter() - started,
                "pinned host" if images.is_pinned() else images.device,
            )
        return self.splits[split]

    def __call__(self, arrays: ArrayRecord, split: str) -> dict[str, float]:
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            load_trainable(self.model, arrays.to_torch_state_dict())
            state = self._evaluate(self.images(split))
            if self.device.type == "cuda":  # give the clients' actors the memory back
                torch.cuda.empty_cache()
        return {f"{split}_{k}": v for k, v in state.compute().items()}

    def _evaluate(self, data: EvalImages) -> MetricState:
        """Evaluate, halving the batch on CUDA out-of-memory (the GPU is shared with the
        clients' actors, whose memory Ray does not cap); the working size is kept."""
        while True:
            try:
                return evaluate(
                    self.model,
                    data,
                    self.data.num_labels,
                    self.batch_size,
                    self.device,
                    self.precision,
                )
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                torch.cuda.empty_cache()
                log.warning("central evaluation: out of GPU memory, batch -> %d", self.batch_size)
