"""Shared fixtures: small synthetic FLAIR datasets made once per test session."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
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


@contextlib.contextmanager
def local_ray_head(temp_dir: Path, env: dict[str, str] | None = None) -> Iterator[str | None]:
    """A Ray head on loopback in its own process group (as `ray start --head` on a cluster's
    first machine); yields its address, or None if it did not come up. `env`: extra
    environment of the node (its clients see it)."""
    port = _free_port()
    ray = Path(sys.executable).with_name("ray")
    # `--block` keeps the head's processes under this one process group, so teardown stops
    # this head only (`ray stop` would stop every Ray cluster on the machine).
    head = subprocess.Popen(
        [
            str(ray),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        yield f"127.0.0.1:{port}" if _wait_for_port(port, head) else None
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, sig)
            try:
                head.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """One local Ray head for the whole session (saves Ray's start-up in every run).

    Runs attach to it with `+simulation.backend.init_args.address=...`. If it cannot be
    started, yields None and each run starts its own Ray.
    """
    with local_ray_head(tmp_path_factory.mktemp("ray")) as address:
        yield address


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 90) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(2)  # the GCS listens before the raylet has registered
                return True
        time.sleep(0.5)
    return False


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
