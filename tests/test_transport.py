"""The two weight transports: the same aggregates and metrics, through the real simulation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from flair_fl.federated.round import is_measurement
from flair_fl.federated.transport import SharedTransport, map_flat, write_flat
from flair_fl.modes.federated import run_experiment
from flair_fl.protocol import Layout, flatten_record
from tests.helpers import compose_config, metrics_rows


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "fc.bias": rng.normal(size=(7,)).astype(np.float32),
    }


def test_flat_file_round_trip_keeps_names_shapes_and_values(tmp_path: Path) -> None:
    arrays = _arrays()
    layout = write_flat(tmp_path / "w.f32", {k: torch.from_numpy(v) for k, v in arrays.items()})
    assert layout == Layout.from_json(layout.to_json())
    views = layout.views(map_flat(tmp_path / "w.f32", layout))
    assert list(views) == list(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(views[name], value)
    assert not list(tmp_path.glob(".*tmp")), "the temp file is renamed, never left behind"


def test_flatten_record_matches_the_flat_file(tmp_path: Path) -> None:
    arrays = _arrays(1)
    layout, flat = flatten_record(ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    write_flat(tmp_path / "w.f32", arrays)
    np.testing.assert_array_equal(flat, map_flat(tmp_path / "w.f32", layout))


def test_a_short_file_is_refused(tmp_path: Path) -> None:
    arrays = _arrays()
    write_flat(tmp_path / "w.f32", {"fc.bias": arrays["fc.bias"]})
    with pytest.raises(ValueError, match="layout needs"):
        map_flat(tmp_path / "w.f32", Layout.of(arrays))


def test_shared_transport_publishes_once_and_cleans_up(tmp_path: Path) -> None:
    transport = SharedTransport(tmp_path)
    record = ArrayRecord({k: Array(v) for k, v in _arrays().items()})
    entries, inline = transport.publish("train", record)
    assert inline is None, "no arrays ride in the messages"
    assert Path(entries["weights-path"]).is_file()
    transport.end_round()
    assert not Path(entries["weights-path"]).exists()
    transport.close()
    assert not list(tmp_path.iterdir())


def _run(tmp_path: Path, overrides: list[str], name: str) -> tuple[list[dict], dict]:
    cfg = compose_config(overrides)
    out = tmp_path / name
    run_experiment(cfg, out)
    rows = metrics_rows(out)
    model = torch.load(out / "model_final.pt")
    return rows, model


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not is_measurement(k)} for row in rows]


@pytest.mark.parametrize(
    "extra",
    [
        ["strategy=fedavg"],
        # central DP (seeded noise, so two runs can agree): clipped in the streaming reduction
        ["strategy=fedadam", "privacy=dp", "privacy.secure_noise=false"],
        pytest.param(["strategy=scaffold"], marks=pytest.mark.slow),  # control variates too
    ],
    ids=["fedavg", "fedadam-central-dp", "scaffold"],
)
@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_shared_and_message_transports_give_identical_runs(
    run_overrides: list[str], tmp_path: Path, extra: list[str]
) -> None:
    base = [*run_overrides, *extra, "num_rounds=3", "eval_every=1"]
    rows_m, model_m = _run(tmp_path, [*base, "simulation.transport=message"], "message")
    rows_s, model_s = _run(tmp_path, [*base, "simulation.transport=shared"], "shared")
    assert len(rows_s) == 3
    assert _without_timing(rows_s) == _without_timing(rows_m)
    assert model_s.keys() == model_m.keys()
    for name in model_m:
        assert torch.equal(model_s[name], model_m[name]), name
    cohort = compose_config(base).cohort_size
    assert all(row["clients_ok"] == cohort and row["train_images"] > 0 for row in rows_s)
