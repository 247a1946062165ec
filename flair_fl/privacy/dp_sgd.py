"""Sample-level DP-SGD for one client's local training (Opacus).

`train_local_dp_sgd` mirrors `flair_fl.learning.local_training.train_local`: same arguments plus the
DP-SGD settings, same return dict plus the client's own accountant figures. Each local step
uses Poisson sampling at rate q = 1 / ceil(n / batch_size) over the user's n images, clips
every example's gradient to `max_grad_norm` and adds N(0, (z * max_grad_norm)^2) noise to
their sum (Abadi et al. 2016). The guarantee protects one image of one user; see
`SampleLevelLedger` for how participations compose over a run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from flair_fl.learning.local_training import (
    BatchInputs,
    LocalTraining,
    batch_input,
    batch_loader,
)
from flair_fl.privacy.opacus_models import (
    copy_parameters_back,
    opacus_ready_copy,
    require_dp_sgd_compatible,
)
from flair_fl.services.seeds import derive_seed


@dataclass(frozen=True)
class DPSGDSettings:
    """DP-SGD knobs, as sent to clients (`Privacy.client_settings`)."""

    noise_multiplier: float = 1.0  # z: noise std / max_grad_norm on each step's gradient sum
    max_grad_norm: float = 1.0  # per-example gradient L2 bound
    delta: float = 1e-5  # delta of the per-participation epsilon a client reports

    @classmethod
    def parse(cls, value: DPSGDSettings | Mapping[str, Any]) -> DPSGDSettings:
        """Accept the plain dict a ClientSpec carries."""
        if isinstance(value, DPSGDSettings):
            return value
        known = {k: float(v) for k, v in value.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus's rate for a loader of `batch_size`: one over the number of batches."""
    return 1.0 / math.ceil(num_examples / batch_size)


def train_local_dp_sgd(
    model: nn.Module,
    dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
    settings: LocalTraining,
    device: torch.device,
    generator: torch.Generator,
    dp: DPSGDSettings | Mapping[str, Any],
    grad_correction: dict[str, torch.Tensor] | None = None,
    inputs: BatchInputs | None = None,
) -> dict[str, float]:
    """Train `model` in place with DP-SGD on `dataset`; `train_local`'s dict + DP figures.

    `settings.grad_clip` is not applied: per-example clipping to `max_grad_norm` bounds
    the gradients. The FedProx term and `grad_correction` (SCAFFOLD's c - c_i) do not
    depend on this round's data, so they are added after the noise. `generator` fixes the
    Poisson batches; the noise generator derives from it. `inputs`: as in `train_local`
    (the augmentation runs on the batch before the model, outside the per-example gradients).
    """
    dp = DPSGDSettings.parse(dp)
    require_dp_sgd_compatible(model)
    # Train a copy: Opacus's hooks and per-sample buffers stay off the resident model.
    private = opacus_ready_copy(model, device)
    named = [
        (name, p)
        for (name, _), p in zip(model.named_parameters(), private.parameters(), strict=True)
        if p.requires_grad
    ]
    params = [p for _, p in named]
    corrections = [grad_correction[n].to(device) for n, _ in named] if grad_correction else []
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    loader = batch_loader(dataset, settings.batch_size, generator)
    engine, (hooks, dp_optimizer, dp_loader) = _make_private(
        private, optimizer, loader, dp, (device, generator)
    )
    global_params = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
    try:
        with warnings.catch_warnings():
            # The first layer's input needs no gradient; Opacus only needs its output's.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss_sum, seen, steps = _dp_epochs(
                private,
                dp_loader,
                dp_optimizer,
                (global_params, corrections),
                settings,
                (device, inputs),
            )
    finally:
        hooks.cleanup()
    copy_parameters_back(private, model)
    (noise_multiplier, sample_rate, _), *_ = engine.accountant.history or [(0.0, 0.0, 0)]
    return {
        "train_loss": loss_sum / max(seen, 1),
        "num_examples": float(len(dataset)),  # type: ignore[arg-type]
        "num_steps": float(steps),
        "dp_epsilon": float(engine.get_epsilon(dp.delta)) if steps else 0.0,
        "dp_sample_rate": float(sample_rate),
        "dp_noise_multiplier": float(noise_multiplier),
    }


def _make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    dp: DPSGDSettings,
    seeding: tuple[torch.device, torch.Generator],
) -> tuple[PrivacyEngine, tuple[Any, DPOptimizer, DataLoader[Any]]]:
    """Opacus's engine and (hooks, DP optimizer, Poisson loader) for `model`; the noise is
    seeded from the batch generator's seed, so a run is reproducible."""
    device, generator = seeding
    noise = torch.Generator(device=device)
    noise.manual_seed(derive_seed(generator.initial_seed(), "dp-sgd-noise"))
    with warnings.catch_warnings():  # seeded noise is deliberate: runs are reproducible
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        noise_generator=noise,
        wrap_model=False,
    )
    return engine, made


def _dp_epochs(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: DPOptimizer,
    extra: tuple[list[torch.Tensor], list[torch.Tensor]],
    settings: LocalTraining,
    where: tuple[torch.device, BatchInputs | None],
) -> tuple[float, int, int]:
    """The DP-SGD loop; returns (loss sum, examples seen, optimizer steps)."""
    device, inputs = where
    params = [p for group in optimizer.param_groups for p in group["params"]]
    global_params, corrections = extra
    loss_sum, seen, steps = 0.0, 0, 0
    for _ in range(settings.epochs):
        for batch, targets in loader:
            images = batch_input(batch, device, torch.contiguous_format, inputs)
            targets = targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(model(images), targets)
            loss.backward()  # per-example gradients (an empty Poisson batch gives none)
            if optimizer.pre_step():  # clip per example, sum, add noise, average
                _add_data_independent_terms(params, global_params, corrections, settings)
                optimizer.original_optimizer.step()
            steps += 1
            if len(images):
                loss_sum += loss.item() * len(images)
                seen += len(images)
    return loss_sum, seen, steps


def _add_data_independent_terms(
    params: list[nn.Parameter],
    global_params: list[torch.Tensor],
    corrections: list[torch.Tensor],
    settings: LocalTraining,
) -> None:
    for p, g in zip(params, global_params, strict=False):  # FedProx: mu * (w - w_global)
        p.grad.add_(p.detach() - g, alpha=settings.proximal_mu)  # type: ignore[union-attr]
    for p, correction in zip(params, corrections, strict=False):
        p.grad.add_(correction)  # type: ignore[union-attr]
