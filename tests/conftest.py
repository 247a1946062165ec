"""Shared fixtures: small synthetic FLAIR datasets made once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flair_fl.data.prepare import prepare_flair
from flair_fl.data.synthetic import SyntheticSpec, generate_synthetic_flair

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
# Synthetic datasets the run tests generate are cached here across test sessions.
CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "flair_fl_tests"


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-user, 32 px synthetic FLAIR directory in the raw release layout."""
    return generate_synthetic_flair(
        tmp_path_factory.mktemp("raw"), SyntheticSpec(num_users=60, image_size=32, seed=3)
    )


@pytest.fixture(scope="session")
def tiny_hdf5(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_raw` prepared in pfl-research's per-user layout."""
    return prepare_flair(tiny_raw, tmp_path_factory.mktemp("h5") / "flair.hdf5", progress=False)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """One local Ray head for the whole session (saves Ray's start-up in every run).

    Runs attach to it with `+simulation.backend.init_args.address=...`. If it cannot be
    started, yields None and each run starts its own Ray.
    """
    port = _free_port()
    ray = Path(sys.executable).with_name("ray")
    temp_dir = tmp_path_factory.mktemp("ray")
    started = subprocess.run(
        [
            str(ray),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    yield f"127.0.0.1:{port}" if started.returncode == 0 else None
    subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120, check=False)


@pytest.fixture
def run_overrides(ray_head: str | None, tmp_path: Path) -> list[str]:
    """Overrides every end-to-end test uses: tiny debug setting, shared cache and Ray head."""
    overrides = ["debug=tiny", f"data.cache_dir={CACHE_DIR}"]
    if ray_head:
        overrides += [
            f"+simulation.backend.init_args.address={ray_head}",
            "~simulation.backend.init_args.include_dashboard",
        ]
    return overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
