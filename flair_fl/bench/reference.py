"""The lower bound for one process: the same client work, in plain PyTorch, one user after
another on one device, aggregated with an in-place sum into a buffer allocated once.

It uses what a flair-fl client uses (the ClientSpec the run would ship, the same HDF5
reader, augmentation, seeds and `train_local`), so both paths train the same users on the same
images; only the orchestration differs: no Flower, no Ray, no processes, no transport.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from flair_fl.data.source import FederatedData, open_reader
from flair_fl.federated.client_app import train_images
from flair_fl.federated.sampling import CohortSampler
from flair_fl.learning.local_training import train_local
from flair_fl.modes.build import build, device_for
from flair_fl.services.memory import peak_rss_mb
from flair_fl.services.seeds import derive_seed


def run_reference(cfg: DictConfig, workdir: Path, threads: int = 1) -> list[dict[str, Any]]:
    """Per-round timings of the reference on the run config's workload."""
    from flair_fl.modes.build import client_spec  # the exact spec flair-fl's clients get

    torch.set_num_threads(threads)
    data: FederatedData = build(cfg.data, "data")
    spec = client_spec(cfg, data, build(cfg.privacy, "privacy"), workdir)
    device = device_for(cfg.device)
    reader = open_reader(spec.hdf5_path, **spec.reader_settings)
    sampler = CohortSampler(list(reader.population("train")), cfg.cohort_size, cfg.seed)
    torch.manual_seed(derive_seed(cfg.seed, "model-init"))
    model = instantiate(spec.model)(num_classes=spec.num_labels).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    global_params = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    rows = []
    for server_round in range(1, cfg.num_rounds + 1):
        started = time.perf_counter()
        users = sampler.sample(server_round)
        images = 0
        for t in total:
            t.zero_()
        for user in users:
            with torch.no_grad():
                for p, g in zip(params, global_params, strict=True):
                    p.copy_(g)
            seed = derive_seed(spec.seed, "client", server_round, user)
            dataset = train_images(spec, reader, user, seed, device)
            torch.manual_seed(seed)
            stats = train_local(
                model,
                dataset,
                spec.training,
                device,
                torch.Generator().manual_seed(seed),
                inputs=dataset.inputs,
            )
            images += int(stats["num_examples"])
            with torch.no_grad():
                for t, p in zip(total, params, strict=True):
                    t.add_(p)
        with torch.no_grad():
            for g, t in zip(global_params, total, strict=True):
                g.copy_(t / len(users))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append(
            {
                "round": server_round,
                "round_time_s": time.perf_counter() - started,
                "train_images": images,
                "train_loss_last_user": stats["train_loss"],
                "finite": bool(all(np.isfinite(g.cpu().numpy()).all() for g in global_params)),
            }
        )
    peak = peak_rss_mb()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    for row in rows:
        row.update(
            peak_rss_mb=peak, gpu_mem_mb=gpu, pid=os.getpid(), threads=torch.get_num_threads()
        )
    return rows
