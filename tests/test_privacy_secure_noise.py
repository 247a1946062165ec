"""Secure central-DP noise: nobody can regenerate it from the seed; everything else stays put."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flair_fl.modes.federated import run_experiment
from flair_fl.privacy.central_stages import NoiseSettings
from tests.helpers import compose_config, metrics_rows

# What a round computes before the noise: the sampled users' training and the statistics
# of their updates (val_* come after the noise, timings differ between any two runs).
BEFORE_NOISE = ("train_", "clients_", "round", "dp_")


def test_secure_generator_differs_per_draw_and_seeded_one_is_a_function_of_seed_and_round() -> None:
    secure, seeded = NoiseSettings(4, 1.0, seed=7, secure=True), NoiseSettings(4, 1.0, seed=7)

    first, second = (secure.generator(1).normal(size=8) for _ in range(2))
    again = NoiseSettings(4, 1.0, seed=7).generator(1).normal(size=8)

    assert not np.allclose(first, second)
    assert np.array_equal(seeded.generator(1).normal(size=8), again)
    assert not np.allclose(seeded.generator(2).normal(size=8), again)


def _before_noise(run_dir: Path) -> list[dict[str, Any]]:
    rows = metrics_rows(run_dir)
    return [
        {k: v for k, v in row.items() if k.startswith(BEFORE_NOISE) and not k.endswith("_s")}
        for row in rows
    ]


@pytest.mark.slow  # four real one-round runs through the Flower simulation
def test_secure_noise_differs_between_same_seed_runs_and_seeded_noise_reproduces(
    run_overrides: list[str], tmp_path: Path
) -> None:
    base = [
        *run_overrides,
        "privacy=dp",
        "privacy.noise_multiplier=1.0",
        "num_rounds=1",
        "eval_every=0",
        "eval.test_at_end=false",
    ]
    runs = {}
    for mode in ("true", "false"):
        for copy in ("a", "b"):
            out = tmp_path / f"{mode}-{copy}"
            run_experiment(compose_config([*base, f"privacy.secure_noise={mode}"]), out)
            runs[mode, copy] = out

    def model(out: Path) -> dict[str, torch.Tensor]:
        return torch.load(out / "model_final.pt", weights_only=True)

    secure_a, secure_b = model(runs["true", "a"]), model(runs["true", "b"])
    seeded_a, seeded_b = model(runs["false", "a"]), model(runs["false", "b"])
    # Same users, same data order, same local training: the clients' metrics and the
    # pre-noise statistics (update norms, clipped share) agree in every run ...
    reference = _before_noise(runs["false", "a"])
    assert {"train_loss", "dp_update_norm_mean", "dp_clipped_fraction"} <= reference[0].keys()
    for out in runs.values():
        assert _before_noise(out) == reference
    # ... but the released models differ with secure noise and are identical when seeded.
    assert all(torch.equal(seeded_a[k], seeded_b[k]) for k in seeded_a)
    assert any(not torch.equal(secure_a[k], secure_b[k]) for k in secure_a)
    described = json.loads((runs["true", "a"] / "privacy.json").read_text())
    assert described["noise_reproducible_from_seed"] is False
    assert described["noise_source"] == "os-entropy"
    seeded = json.loads((runs["false", "a"] / "privacy.json").read_text())
    assert seeded["noise_reproducible_from_seed"] is True and seeded["noise_source"] == "seed"
