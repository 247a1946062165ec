"""`simulation=cluster`: attach to a running Ray cluster (a head started on loopback here)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import h5py
import pytest

from flair_fl.federated.client_app import node_data_path
from flair_fl.modes.build import build
from flair_fl.modes.federated import run_experiment
from tests.conftest import CACHE_DIR, local_ray_head
from tests.helpers import compose_config, metrics_rows


def _blank_train_images(src: Path, dst: Path) -> None:
    """A copy of the data file whose train images are all black (same users and labels)."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        for user in f["train"]:
            f["train"][user]["images"][...] = 0


def _train_losses(out: Path) -> list[float]:
    return [row["train_loss"] for row in metrics_rows(out)]


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_two_rounds_on_a_ray_head_with_a_per_node_data_path(
    tmp_path: Path, ray_head: str | None
) -> None:
    base = ["debug=tiny", f"data.cache_dir={CACHE_DIR}", "simulation=cluster"]
    data_path = Path(build(compose_config(base).data, "data").hdf5_path)
    node_copy = tmp_path / "node-data" / "flair.hdf5"
    node_copy.parent.mkdir()
    _blank_train_images(data_path, node_copy)
    short = Path(tempfile.mkdtemp(prefix="ray"))  # Ray's socket paths must stay < 108 chars
    with local_ray_head(short, env={"FLAIR_FL_NODE_DATA": str(node_copy)}) as address:
        if address is None:
            pytest.skip("a local Ray head could not be started here")
        summary = run_experiment(
            compose_config([*base, f"simulation.address={address}"]), tmp_path / "cluster"
        )
    assert summary["rounds"] == 2
    rows = metrics_rows(tmp_path / "cluster")
    assert [r["clients_ok"] for r in rows] == [3, 3]
    # The same run where the nodes read the driver's file trains on other images.
    assert ray_head is not None
    run_experiment(compose_config([*base, f"simulation.address={ray_head}"]), tmp_path / "own")
    assert _train_losses(tmp_path / "cluster") != _train_losses(tmp_path / "own")


def test_node_data_path_prefers_the_nodes_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_config(["debug=tiny", f"data.cache_dir={CACHE_DIR}"])
    from flair_fl.modes.build import client_spec  # the spec the run ships to clients

    data = build(cfg.data, "data")
    spec = client_spec(cfg, data, build(cfg.privacy, "privacy"), Path("/tmp"))
    monkeypatch.delenv("FLAIR_FL_NODE_DATA", raising=False)
    assert node_data_path(spec) == str(data.hdf5_path)
    monkeypatch.setenv("FLAIR_FL_NODE_DATA", "/data/on/this/node.hdf5")
    assert node_data_path(spec) == "/data/on/this/node.hdf5"
