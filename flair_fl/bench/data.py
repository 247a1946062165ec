"""Data-path benchmark, training side: the old per-image path against the batched one.

Both paths do what a client does with one user before and around its model (no model here):
read the user's capped images from the HDF5 file (decoding the compact store's JPEGs), then
for every epoch draw the batches in a seeded order and produce the augmented float batch
(RandomResizedCrop + flip + scale + normalise) on the device.
- old: torchvision v2 transforms per image in `UserDataset.__getitem__`, a DataLoader
  collating float images, then `.to(device)` (the client's path before the batched one);
- new: the user's images to the device once as uint8 (`TrainImages`), shuffled batches of
  indices (`epoch_batches`), each batch augmented there (`TrainAugment`), JPEGs decoded
  there (nvJPEG on CUDA).
They run interleaved (old, new, old, new, ... per store and device), so load from other
processes falls on both alike and their ratio is trustworthy on a shared machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from flair_fl.data.augment import TrainAugment
from flair_fl.data.datasets import TrainImages, UserDataset, build_transform
from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.prepare import prepare_flair
from flair_fl.data.synthetic import SyntheticSpec, generate_synthetic_flair, is_complete
from flair_fl.learning.local_training import epoch_batches

STORES = ("uint8", "jpeg")
PATHS = ("old", "new", "new-nhwc")  # new-nhwc: the new path's channels-last batches
FORMATS = {"new": torch.contiguous_format, "new-nhwc": torch.channels_last}


@dataclass(frozen=True)
class TrainBench:
    """The training side's workload: `users` synthetic users at `image_size` px stored,
    `input_size` px into the model, `epochs` local epochs of batch `batch_size`."""

    users: int = 40  # synthetic population; its train users (~80%) are each trained once
    image_size: int = 256
    input_size: int = 224
    epochs: int = 2
    batch_size: int = 16
    max_images: int = 512
    repeats: int = 3  # old/new pairs per store and device
    threads: int = 1  # torch threads (a client actor's default: one core)
    seed: int = 0
    cache_dir: str = ".cache/flair_fl"


def bench_files(bench: TrainBench) -> dict[str, Path]:
    """The training side's synthetic set in both stores."""
    return synthetic_stores(bench.users, bench.image_size, bench.seed, bench.cache_dir)


def synthetic_stores(users: int, image_size: int, seed: int, cache_dir: str) -> dict[str, Path]:
    """A synthetic set in both stores (made once, cached by its parameters); shared by the
    train and eval modes."""
    spec = SyntheticSpec(num_users=users, image_size=image_size, seed=seed)
    root = Path(cache_dir).expanduser() / f"bench-data-{spec.key()}"
    raw = root / "raw"
    if not is_complete(raw, spec):
        generate_synthetic_flair(raw, spec)
    files = {}
    for store in STORES:
        path = root / f"flair-{store}.hdf5"
        if not path.is_file():
            prepare_flair(raw, path, progress=False, store=store)  # type: ignore[arg-type]
        files[store] = path
    return files


def _old_path(reader: FlairHDF5, user: str, bench: TrainBench, device: torch.device) -> int:
    transform = build_transform(train=True, size=bench.input_size)
    dataset = UserDataset.from_file(reader, "train", user, "coarse", transform, bench.max_images)
    torch.manual_seed(bench.seed)
    order = torch.Generator().manual_seed(bench.seed)
    loader = DataLoader(dataset, batch_size=bench.batch_size, shuffle=True, generator=order)
    seen = 0
    for _ in range(bench.epochs):
        for images, _targets in loader:
            seen += len(images.to(device, non_blocking=True))
    return seen


def _new_path(
    reader: FlairHDF5, user: str, bench: TrainBench, device: torch.device, path: str
) -> int:
    augment, generator = TrainAugment(bench.input_size), torch.Generator().manual_seed(bench.seed)
    data = TrainImages.from_file(
        reader, user, "coarse", augment, generator, device, bench.max_images
    )
    order = torch.Generator().manual_seed(bench.seed)
    seen = 0
    for _ in range(bench.epochs):
        for index, _targets in epoch_batches(data, bench.batch_size, order):
            seen += len(data.inputs(index, FORMATS[path]))
    return seen


STAGES = ("read", "to device", "batch indices", "augment")


def _new_path_stages(
    reader: FlairHDF5, users: list[str], bench: TrainBench, device: torch.device
) -> dict[str, float]:
    """The new path once more, each stage's CPU time apart (ms per trained image): the HDF5
    read, the user's images to the device (the JPEG store's decode), the shuffled batches
    of indices, the augmentation. Its own pass: the clock reads would tax the timed ones."""
    spent = dict.fromkeys(STAGES, 0.0)
    seen = 0
    for user in users:
        clock = time.process_time()
        stored = reader.read_user_stored("train", user, "coarse", bench.max_images)
        clock = _lap(spent, "read", clock)
        augment, generator = (
            TrainAugment(bench.input_size),
            torch.Generator().manual_seed(bench.seed),
        )
        data = TrainImages(stored, augment, generator, device)
        clock = _lap(spent, "to device", clock)
        order = torch.Generator().manual_seed(bench.seed)
        for _ in range(bench.epochs):
            for index, _targets in epoch_batches(data, bench.batch_size, order):
                clock = _lap(spent, "batch indices", clock)
                seen += len(data.inputs(index))
                clock = _lap(spent, "augment", clock)
            clock = _lap(spent, "batch indices", clock)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        _lap(spent, "augment", clock)
    return {stage: 1e3 * cpu / seen for stage, cpu in spent.items()}


def _lap(spent: dict[str, float], stage: str, since: float) -> float:
    now = time.process_time()
    spent[stage] += now - since
    return now


def _augment_only(path: str, bench: TrainBench, device: torch.device) -> dict[str, float]:
    """The transforms alone, on one batch of in-memory 256 px images, 50 times."""
    g = torch.Generator().manual_seed(bench.seed)
    size = (bench.batch_size, bench.image_size, bench.image_size, 3)
    nhwc = torch.randint(0, 256, size, dtype=torch.uint8, generator=g).to(device)
    chw = nhwc.permute(0, 3, 1, 2).contiguous()
    transform, augment = build_transform(True, bench.input_size), TrainAugment(bench.input_size)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(50):
        if path == "old":
            torch.stack([transform(image) for image in chw])
        else:
            augment(nhwc, g, FORMATS[path])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "images": 50 * bench.batch_size,
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
    }


def _timed(
    path: str, reader: FlairHDF5, users: list[str], bench: TrainBench, device: torch.device
) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    if path == "old":
        images = sum(_old_path(reader, user, bench, device) for user in users)
    else:
        images = sum(_new_path(reader, user, bench, device, path) for user in users)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "images": images,
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
    }


def run_train_bench(bench: TrainBench, devices: list[torch.device]) -> dict[str, Any]:
    """Old and new training data paths, interleaved; per store and device: CPU ms per
    trained image (process CPU time), images/s (wall), and new / old ratios."""
    torch.set_num_threads(bench.threads)
    files = bench_files(bench)
    readers = {store: FlairHDF5(path) for store, path in files.items()}
    users = list(readers["uint8"].population("train"))
    load_before = os.getloadavg()
    samples: dict[str, list[dict[str, float]]] = {}
    for device in devices:
        for path in PATHS:  # warm-up: file cache, allocator, CUDA context, kernels
            _timed(path, readers["uint8"], users[:2], bench, device)
        for _ in range(bench.repeats):
            for store, reader in readers.items():
                for path in PATHS:
                    key = f"{device.type}/{store}/{path}"
                    samples.setdefault(key, []).append(_timed(path, reader, users, bench, device))
            for path in PATHS:
                key = f"{device.type}/augment only/{path}"
                samples.setdefault(key, []).append(_augment_only(path, bench, device))
    stages = {
        f"{device.type}/{store}": _new_path_stages(reader, users, bench, device)
        for device in devices
        for store, reader in readers.items()
    }
    results: dict[str, Any] = {}
    for key, runs in samples.items():
        images = sum(r["images"] for r in runs)
        cpu, wall = sum(r["cpu_s"] for r in runs), sum(r["wall_s"] for r in runs)
        results[key] = {
            "trained_images": images,
            "cpu_ms_per_image": 1e3 * cpu / images,
            "images_per_s": images / wall,
            "cpu_ms_per_image_each_repeat": [1e3 * r["cpu_s"] / r["images"] for r in runs],
        }
    for device in devices:
        for store in (*STORES, "augment only"):
            old = results[f"{device.type}/{store}/old"]
            for path in PATHS[1:]:
                new = results[f"{device.type}/{store}/{path}"]
                new["cpu_ratio_to_old"] = new["cpu_ms_per_image"] / old["cpu_ms_per_image"]
    return {
        "workload": asdict(bench),
        "train_users": len(users),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
        "new_path_cpu_ms_per_image_by_stage": stages,
    }


def train_markdown(report: dict[str, Any]) -> list[str]:
    """The training side's table."""
    w = report["workload"]
    lines = [
        f"Training data path: {report['train_users']} synthetic users, {w['image_size']} px "
        f"stored -> {w['input_size']} px input, at most {w['max_images']} images per user, "
        f"{w['epochs']} epochs of batch {w['batch_size']}, {w['threads']} torch thread(s), "
        f"{w['repeats']} interleaved old/new repeats; no model (the data path alone). "
        "Store rows: read + decode + augment + to device per user; `augment only`: the "
        "transforms alone on a batch of in-memory images. Paths: old = per-image torchvision "
        "transforms; new = batched, channel-planar float batches (the default); new-nhwc = "
        "batched, channels-last float batches (`client.channels_last=true`).",
        "",
        "| device / store | path | CPU ms per trained image | images/s (wall) | new / old CPU |",
        "|---|---|---|---|---|",
    ]
    for key, r in report["results"].items():
        device, store, path = key.split("/")
        ratio = f"{r['cpu_ratio_to_old']:.2f}" if "cpu_ratio_to_old" in r else ""
        lines.append(
            f"| {device} / {store} | {path} | {r['cpu_ms_per_image']:.3f} "
            f"| {r['images_per_s']:.0f} | {ratio} |"
        )
    lines += [
        "",
        "Where the new path's CPU goes (ms per trained image; one more pass, each stage "
        "timed apart): read = HDF5 read of the user's images and labels; to device = the "
        "uint8 tensor on the device (the JPEG store's decode); batch indices = the "
        "shuffled index batches (`epoch_batches`: the DataLoader's order, without its "
        "iterator); augment = crop parameters, resize, cast to float planes, normalise.",
        "",
        f"| device / store | {' | '.join(STAGES)} | total |",
        f"|---|{'---|' * (len(STAGES) + 1)}",
    ]
    for key, stage in report.get("new_path_cpu_ms_per_image_by_stage", {}).items():
        cells = " | ".join(f"{stage[s]:.3f}" for s in STAGES)
        lines.append(f"| {key.replace('/', ' / ')} | {cells} | {sum(stage.values()):.3f} |")
    return lines
