"""scripts/bench_data.py --mode eval: central evaluation's old per-image path against the
in-memory batched one, side by side in one process (paired: A B A B), on every available
device, for both HDF5 stores (uint8 pixels, compact JPEG bytes) and each model.

The data are synthetic FLAIR users stored at `image_size` and evaluated at `input_size` (FLAIR:
256 -> 224), so the resize and the JPEG decode cost what they do on the real data.

Models: `meanpool` is near-free (each image's per-channel mean, then a linear layer 3 ->
labels: ~0.15 MFLOP per 224 px image), so its times are the data path's, as the issue's
starting measurement was; `smallcnn` (~1 GFLOP per 224 px image) and `resnet18` add the
forward pass both paths share. Each (store, model) row reads its own copy of the split, so
its one-time read and first evaluation are measured cold.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from flair_fl.bench.data import synthetic_stores
from flair_fl.bench.eval_paths import in_memory, load_in_memory, per_image
from flair_fl.data.source import FederatedData
from flair_fl.models.resnet import resnet18_groupnorm
from flair_fl.models.small_cnn import small_cnn


@dataclass(frozen=True)
class EvalWorkload:
    """What one evaluation does: the val split of `users` synthetic users."""

    users: int = 400
    image_size: int = 256  # stored px
    input_size: int = 224  # px into the model
    models: tuple[str, ...] = ("meanpool", "smallcnn")  # each: meanpool | smallcnn | resnet18
    batch_size: int = 512
    repeats: int = 3  # A B pairs
    precision: str = "fp32"  # the in-memory path's (fp32 | bf16)
    threads: int = 0  # torch threads; 0: torch's default (the driver's: one per core)
    seed: int = 0
    cache_dir: str = ".cache/flair_fl"


def stores(work: EvalWorkload) -> dict[str, FederatedData]:
    """The synthetic set in both stores, as the driver's data source."""
    files = synthetic_stores(work.users, work.image_size, work.seed, work.cache_dir)
    return {store: FederatedData(path, input_size=work.input_size) for store, path in files.items()}


class MeanPoolLinear(torch.nn.Module):
    """The near-free model: global average pool of the (3, S, S) input, then Linear(3, L)."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.head = torch.nn.Linear(3, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


MODELS: dict[str, Callable[[int], torch.nn.Module]] = {
    "meanpool": MeanPoolLinear,
    "smallcnn": small_cnn,
    "resnet18": resnet18_groupnorm,
}


def _model(name: str, num_labels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name](num_labels)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_store(
    data: FederatedData, work: EvalWorkload, device: torch.device, model_name: str
) -> dict[str, Any]:
    """Paired timings of one store and model on one device: the split read once, then old,
    new, old, new, ..."""
    model = _model(model_name, data.num_labels).to(device)
    started = time.perf_counter()
    held = load_in_memory(data, "val", device)
    _sync(device)
    load_s = time.perf_counter() - started
    n = len(held)
    old_s, new_s, diffs = [], [], []
    for _ in range(work.repeats):
        started = time.perf_counter()
        old = per_image(model, data, "val", work.batch_size, device)
        _sync(device)
        old_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        new = in_memory(model, held, data.num_labels, work.batch_size, device, work.precision)
        _sync(device)
        new_s.append(time.perf_counter() - started)
        a, b = old.compute(), new.compute()
        diffs.append(max(abs(a[k] - b[k]) for k in a))
    ratios = [b / a for a, b in zip(old_s, new_s, strict=True)]
    return {
        "images": n,
        "per_image_s": old_s,
        "in_memory_s": new_s,
        "in_memory_load_once_s": load_s,
        "per_image_images_per_s": n / statistics.median(old_s),
        "in_memory_images_per_s": n / statistics.median(new_s),
        "ratio_in_memory_to_per_image": statistics.median(ratios),
        # The run's first in-memory evaluation (read + first pass) against a per-image one.
        "ratio_first_evaluation": (load_s + new_s[0]) / statistics.median(old_s),
        "max_metric_difference": max(diffs),
        "held_on": "pinned host" if held.images.is_pinned() else str(held.images.device),
    }


def run_eval_benchmark(work: EvalWorkload, devices: list[torch.device]) -> dict[str, Any]:
    """Every store and model on each of `devices`."""
    if work.threads:
        torch.set_num_threads(work.threads)
    report: dict[str, Any] = {
        "workload": asdict(work),
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "results": {},
    }
    data = stores(work)
    for device in devices:
        for store, source in data.items():
            for name in work.models:
                result = bench_store(source, work, device, name)
                report["results"][f"{device.type}/{store}/{name}"] = result
    report["load_after"] = os.getloadavg()
    return report


def eval_markdown(report: dict[str, Any]) -> list[str]:
    """The evaluation side's table (the CLI writes machine and command above it)."""
    w = report["workload"]
    lines = [
        f"Central evaluation: the val split of {w['users']} synthetic users, "
        f"{w['image_size']} px stored -> {w['input_size']} px input, batch "
        f"{w['batch_size']}, {report['torch_threads']} torch threads, {w['repeats']} paired "
        f"repeats (per-image, in-memory, ...), in-memory precision {w['precision']}. "
        "Models: meanpool = global average pool + Linear(3, labels), near-free, so its rows "
        "time the data path; smallcnn = 3 conv blocks (32/64/128 channels), ~1 GFLOP per "
        "image. Ratio = in-memory time / per-image time, median of the pairs; first "
        "evaluation ratio = (one-time read + resize + the first in-memory evaluation) / the "
        "median per-image evaluation. "
        f"Load average (1, 5, 15 min) before: {_load(report['load_before'])}, after: "
        f"{_load(report['load_after'])}",
        "",
        "| device / store / model | images | per-image path (img/s) | in-memory path (img/s) "
        "| time ratio new/old | one-time read + resize (s) "
        "| first evaluation ratio (incl. read) | max metric difference | held on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in report["results"].items():
        lines.append(
            f"| {key} | {r['images']} | {r['per_image_images_per_s']:.1f} "
            f"| {r['in_memory_images_per_s']:.1f} | {r['ratio_in_memory_to_per_image']:.3f} "
            f"| {r['in_memory_load_once_s']:.2f} | {r['ratio_first_evaluation']:.2f} "
            f"| {r['max_metric_difference']:.1e} | {r['held_on']} |"
        )
    return lines


def _load(values: Any) -> str:
    return ", ".join(f"{v:.2f}" for v in values)
