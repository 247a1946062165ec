"""scripts/bench_data.py --mode eval: central evaluation's old per-image path against the
in-memory batched one, side by side in one process (paired: A B A B), on every available
device and for both HDF5 stores (uint8 pixels, compact JPEG bytes).

The data are synthetic FLAIR users stored at `image_size` and evaluated at `input_size` (FLAIR:
256 -> 224), so the resize and the JPEG decode cost what they do on the real data.
"""

from __future__ import annotations

import os
import statistics
import time
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
    model: str = "smallcnn"  # smallcnn | resnet18
    batch_size: int = 512
    repeats: int = 3  # A B pairs
    precision: str = "fp32"  # the in-memory path's (fp32 | bf16)
    seed: int = 0
    cache_dir: str = ".cache/flair_fl"


def stores(work: EvalWorkload) -> dict[str, FederatedData]:
    """The synthetic set in both stores, as the driver's data source."""
    files = synthetic_stores(work.users, work.image_size, work.seed, work.cache_dir)
    return {store: FederatedData(path, input_size=work.input_size) for store, path in files.items()}


def _model(work: EvalWorkload, num_labels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if work.model == "resnet18":
        return resnet18_groupnorm(num_classes=num_labels)
    return small_cnn(num_classes=num_labels)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_store(data: FederatedData, work: EvalWorkload, device: torch.device) -> dict[str, Any]:
    """Paired timings of one store on one device: old, new, old, new, ..."""
    model = _model(work, data.num_labels).to(device)
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
        "ratio_first_evaluation": (load_s + new_s[0]) / old_s[0],
        "max_metric_difference": max(diffs),
        "held_on": "pinned host" if held.images.is_pinned() else str(held.images.device),
    }


def run_eval_benchmark(work: EvalWorkload, devices: list[torch.device]) -> dict[str, Any]:
    """Every store on each of `devices`."""
    report: dict[str, Any] = {
        "workload": asdict(work),
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "results": {},
    }
    data = stores(work)
    for device in devices:
        for store, source in data.items():
            report["results"][f"{device.type}/{store}"] = bench_store(source, work, device)
    report["load_after"] = os.getloadavg()
    return report


def eval_markdown(report: dict[str, Any]) -> list[str]:
    """The evaluation side's table (the CLI writes machine and command above it)."""
    w = report["workload"]
    lines = [
        f"Central evaluation: the val split of {w['users']} synthetic users, "
        f"{w['image_size']} px stored -> {w['input_size']} px input, {w['model']}, batch "
        f"{w['batch_size']}, {report['torch_threads']} torch threads, {w['repeats']} paired "
        f"repeats (per-image, in-memory, ...), in-memory precision {w['precision']}. "
        f"Load average (1, 5, 15 min) before: {_load(report['load_before'])}, after: "
        f"{_load(report['load_after'])}",
        "",
        "| device / store | images | per-image path (img/s) | in-memory path (img/s) "
        "| time ratio new/old (median of pairs) | one-time read + resize (s) "
        "| first evaluation ratio (incl. read) | max metric difference | held on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in report["results"].items():
        lines.append(
            f"| {key} | {r['images']} | {r['per_image_images_per_s']:.0f} "
            f"| {r['in_memory_images_per_s']:.0f} | {r['ratio_in_memory_to_per_image']:.3f} "
            f"| {r['in_memory_load_once_s']:.2f} | {r['ratio_first_evaluation']:.2f} "
            f"| {r['max_metric_difference']:.1e} | {r['held_on']} |"
        )
    return lines


def _load(values: Any) -> str:
    return ", ".join(f"{v:.2f}" for v in values)
