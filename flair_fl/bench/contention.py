"""scripts/bench_data.py --mode contention: does the driver's central evaluation starve the
clients that share its device?

With `eval.overlap`, round r's model is evaluated in the driver while round r+1's clients
train on the same GPU. This measures what that costs the clients: `clients` training
processes (spawned, as Ray's actors are separate processes) each run the client's own path
(`TrainImages` + `train_local`: uint8 images on the device, batched augmentation, SGD) on
`client_model` without pause, while the driver process sleeps for a phase, then evaluates
back to back for a phase (`CentralEvaluator`, on its own CUDA stream, as a run does), then
sleeps again. Every client records when each of its local trainings ended, so its images/s
is known in each phase (a training spanning two phases counts in each with its share of
time); the evaluation's own images/s is measured alone first.

Reported: the clients' summed images/s alone (the two quiet phases) and beside the
evaluation, their ratio (1.0: no starvation), and the evaluation's images/s alone and
beside the clients.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from flair_fl.bench.data_eval import MODELS, EvalWorkload, stores
from flair_fl.data.augment import TrainAugment
from flair_fl.data.datasets import TrainImages
from flair_fl.data.decode import StoredImages
from flair_fl.data.hdf5_layouts import StoredUser
from flair_fl.learning.evaluator import CentralEvaluator
from flair_fl.learning.local_training import LocalTraining, train_local

PHASES = ("alone", "beside evaluation", "alone again")


@dataclass(frozen=True)
class ContentionWorkload:
    """`clients` training processes and the driver's evaluation on one device."""

    clients: int = 2
    model: str = "smallcnn"  # the clients' and the evaluation's (smallcnn | resnet18 | meanpool)
    image_size: int = 256  # stored px (the eval split's and the clients' images)
    input_size: int = 224
    batch_size: int = 16  # the clients'
    client_images: int = 32  # one local training = one epoch over this many images
    eval_users: int = 400  # the synthetic population whose val split is evaluated
    eval_batch_size: int = 512
    precision: str = "fp32"  # the clients' and the evaluation's (fp32 | bf16)
    phase_s: float = 8.0
    client_threads: int = 1  # torch threads per client process
    cache_dir: str = ".cache/flair_fl"


def _client(
    device_name: str,
    work: ContentionWorkload,
    ready: Any,
    start: Any,
    stop: Any,
    results: Any,
) -> None:
    """One client process: local trainings back to back until `stop`; reports when each
    began and ended and its images (after `start`)."""
    torch.set_num_threads(work.client_threads)
    device = torch.device(device_name)
    rng = np.random.default_rng(os.getpid())
    size = (work.client_images, work.image_size, work.image_size, 3)
    pixels = rng.integers(0, 256, size=size, dtype=np.uint8)
    targets = (rng.random((work.client_images, 17)) < 0.2).astype(np.float32)
    generator = torch.Generator().manual_seed(0)
    data = TrainImages(
        StoredUser(StoredImages(pixels=pixels), targets),
        TrainAugment(work.input_size),
        generator,
        device,
    )
    torch.manual_seed(0)
    model = MODELS[work.model](17)
    settings = LocalTraining(epochs=1, batch_size=work.batch_size, precision=work.precision)
    train_local(model, data, settings, device, generator, inputs=data.inputs)  # warm-up
    ready.put(os.getpid())
    start.wait()
    trainings: list[tuple[float, float, int]] = []
    while not stop.is_set():
        began = time.monotonic()
        stats = train_local(model, data, settings, device, generator, inputs=data.inputs)
        trainings.append((began, time.monotonic(), int(stats["num_examples"])))
    results.put(trainings)


def _evaluate_for(evaluator: CentralEvaluator, arrays: ArrayRecord, seconds: float) -> float:
    """Evaluations back to back for about `seconds`; returns images/s."""
    images, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        evaluator(arrays, "val")
        images += len(evaluator.images("val"))
    return images / (time.monotonic() - started)


def run_contention(work: ContentionWorkload, device: torch.device) -> dict[str, Any]:
    """The clients' images/s in each phase and the evaluation's alone and beside them."""
    data = stores(
        EvalWorkload(
            users=work.eval_users,
            image_size=work.image_size,
            input_size=work.input_size,
            cache_dir=work.cache_dir,
        )
    )["uint8"]
    torch.manual_seed(0)
    model = MODELS[work.model](data.num_labels).to(device)
    arrays = ArrayRecord(model.state_dict())
    evaluator = CentralEvaluator(model, data, work.eval_batch_size, device, work.precision)
    evaluator(arrays, "val")  # read and resize the split once, warm the kernels
    eval_alone = _evaluate_for(evaluator, arrays, work.phase_s / 2)
    context = mp.get_context("spawn")  # CUDA cannot be forked into children
    ready, results = context.Queue(), context.Queue()
    start, stop = context.Event(), context.Event()
    clients = [
        context.Process(
            target=_client, args=(str(device), work, ready, start, stop, results), daemon=True
        )
        for _ in range(work.clients)
    ]
    for process in clients:
        process.start()
    try:
        for _ in clients:
            ready.get(timeout=300)
        start.set()
        edges = [time.monotonic()]
        time.sleep(work.phase_s)
        edges.append(time.monotonic())
        eval_beside = _evaluate_for(evaluator, arrays, work.phase_s)
        edges.append(time.monotonic())
        time.sleep(work.phase_s)
        edges.append(time.monotonic())
        stop.set()
        trainings = [results.get(timeout=300) for _ in clients]
    finally:
        for process in clients:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    rates = phase_rates(trainings, edges)
    alone = (rates[PHASES[0]] + rates[PHASES[2]]) / 2
    return {
        "workload": asdict(work),
        "device": str(device),
        "eval_images": len(evaluator.images("val")),
        "clients_images_per_s": rates,
        "clients_ratio_beside_evaluation": rates[PHASES[1]] / alone if alone else float("nan"),
        "eval_images_per_s_alone": eval_alone,
        "eval_images_per_s_beside_clients": eval_beside,
        "load_average": os.getloadavg(),
    }


def phase_rates(
    trainings: list[list[tuple[float, float, int]]], edges: list[float]
) -> dict[str, float]:
    """Summed client images/s per phase: each local training (began, ended, images) counts
    in a phase with the share of its time that fell in it."""
    rates = {}
    for phase, (begin, end) in zip(PHASES, itertools.pairwise(edges), strict=True):
        images = sum(
            n * max(0.0, min(stop, end) - max(start, begin)) / (stop - start)
            for client in trainings
            for start, stop, n in client
            if stop > start
        )
        rates[phase] = images / (end - begin)
    return rates


def contention_markdown(report: dict[str, Any]) -> list[str]:
    w, rates = report["workload"], report["clients_images_per_s"]
    lines = [
        f"Evaluation beside training on {report['device']}: {w['clients']} client processes "
        f"train {w['model']} ({w['image_size']} px stored -> {w['input_size']} px, batch "
        f"{w['batch_size']}, {w['precision']}, {w['client_threads']} torch thread(s) each) "
        f"without pause, while the driver sleeps {w['phase_s']:g} s, evaluates the val split "
        f"({report['eval_images']} images, batch {w['eval_batch_size']}) back to back for "
        f"{w['phase_s']:g} s, then sleeps again. Load average after: "
        + ", ".join(f"{v:.2f}" for v in report["load_average"]),
        "",
        "| clients' images/s: alone | beside evaluation | alone again | ratio beside / alone "
        "| evaluation images/s: alone | beside clients |",
        "|---|---|---|---|---|---|",
        f"| {rates[PHASES[0]]:.1f} | {rates[PHASES[1]]:.1f} | {rates[PHASES[2]]:.1f} "
        f"| {report['clients_ratio_beside_evaluation']:.2f} "
        f"| {report['eval_images_per_s_alone']:.1f} "
        f"| {report['eval_images_per_s_beside_clients']:.1f} |",
    ]
    return lines
