"""The benchmark's workload: one description, turned into a flair-fl run config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass(frozen=True)
class Workload:
    """What one benchmark round does: `cohort` users train `epochs` local epochs each.

    Users' image counts come from the synthetic generator, which draws them from FLAIR's
    per-user distribution (flair_fl/data/synthetic.py); `max_images` caps them as the FLAIR
    benchmark does (512).
    """

    cohort: int = 16
    model: str = "smallcnn"  # smallcnn | resnet18 (GroupNorm)
    image_size: int = 32  # stored and input size (FLAIR benchmark: 224 input)
    epochs: int = 2
    batch_size: int = 16
    rounds: int = 5
    warmup: int = 1  # rounds left out of the medians (actor start, allocator warm-up)
    users: int = 500  # synthetic population (train users are ~80% of it)
    device: str = "cpu"  # cpu | cuda
    num_cpus: float = 1.0  # per client (Ray actor)
    num_gpus: float = 0.0  # per client: 0.125 = eight clients share a GPU
    supernodes: int | None = None  # concurrency slots (default: the cohort)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    max_images: int = 512
    lr: float = 0.01
    seed: int = 0
    cache_dir: str = ".cache/flair_fl"
    # torch thread counts to run the reference with; the fastest is the lower bound the
    # ratio is taken against. Empty: 1 and every core (flair-fl's actors use them all).
    reference_threads: tuple[int, ...] = ()
    extra_overrides: tuple[str, ...] = ()  # more Hydra overrides (e.g. a Ray head's address)

    def thread_counts(self) -> list[int]:
        """The reference's torch thread counts (default: 1 and all cores)."""
        counts = self.reference_threads or (1, os.cpu_count() or 1)
        return sorted(set(counts))

    def overrides(self, transport: str) -> list[str]:
        """Hydra overrides of the flair-fl run doing this workload."""
        simulation = "gpu" if self.device == "cuda" else "cpu"
        return [
            f"simulation={simulation}",
            f"simulation.transport={transport}",
            f"simulation.num_supernodes={self.supernodes or self.cohort}",
            f"simulation.backend.client_resources.num_cpus={self.num_cpus}",
            f"simulation.backend.client_resources.num_gpus={self.num_gpus}",
            "data=synthetic",
            f"data.num_users={self.users}",
            f"data.image_size={self.image_size}",
            f"data.input_size={self.image_size}",
            f"data.cache_dir={self.cache_dir}",
            f"model={self.model}",
            f"cohort_size={self.cohort}",
            f"num_rounds={self.rounds}",
            f"client.epochs={self.epochs}",
            f"client.batch_size={self.batch_size}",
            f"client.lr={self.lr}",
            f"client.max_images={self.max_images}",
            f"client.precision={self.precision}",
            f"client.channels_last={str(self.channels_last).lower()}",
            f"device={self.device}",
            f"seed={self.seed}",
            "eval_every=0",  # central evaluation only after the last round, timed apart
            "eval.test_at_end=false",
            "checkpoint_every=0",
            "logger=csv",
            *self.extra_overrides,
        ]

    def config(self, transport: str) -> DictConfig:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=self.overrides(transport))
