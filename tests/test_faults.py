"""Client faults through the real simulation: counted per round, survived, never waited on.

The faults are injected by the clients themselves (flair_fl/federated/faults.py, seeded,
off by default): a raise is a real exception in the ClientApp, a hang a real sleep past
`simulation.client_timeout`, a death a real SIGKILL of the Ray actor's process, a NaN
update real NaN weights in the reply. The expected counts are recomputed from the same
seeded draw and the same cohort sampler the run uses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flair_fl.errors import TrainingDiverged
from flair_fl.federated.faults import KINDS, FaultSpec
from flair_fl.federated.sampling import CohortSampler
from flair_fl.modes.build import build, fault_spec
from flair_fl.modes.federated import run_experiment
from tests.helpers import compose_config, metrics_rows

COUNTED = {"raise": "clients_raised", "hang": "clients_timeout", "die": "clients_died"}
COUNTED["nan"] = "clients_rejected"


def test_fault_draw_is_seeded_and_has_the_requested_rate() -> None:
    spec = FaultSpec(probability=0.2, seed=7)
    draws = [spec.draw(r, f"user{u}") for r in range(1, 21) for u in range(100)]
    assert draws == [spec.draw(r, f"user{u}") for r in range(1, 21) for u in range(100)]
    hits = [d for d in draws if d is not None]
    assert 0.17 < len(hits) / len(draws) < 0.23  # 2,000 draws: ~4.7 standard deviations
    assert set(hits) == set(KINDS)
    other = [
        FaultSpec(probability=0.2, seed=8).draw(r, f"user{u}")
        for r in range(1, 21)
        for u in range(100)
    ]
    assert other != draws, "another seed fails other pairs"
    assert all(FaultSpec().draw(r, "u") is None for r in range(1, 50)), "off by default"
    late = FaultSpec(probability=1.0, start_round=3)
    assert late.draw(2, "u") is None and late.draw(3, "u") is not None


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"probability": 1.5}, "probability"), ({"kinds": ("explode",)}, "kinds")],
)
def test_bad_fault_settings_name_the_key(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"client.faults.{message}"):
        FaultSpec(**settings)


def _expected(overrides: list[str]) -> list[dict[str, int]]:
    """Per round: how many of the sampled users the seeded draw makes fail, by kind."""
    cfg = compose_config(overrides)
    users = list(build(cfg.data, "data").reader.population("train"))
    sampler, spec = CohortSampler(users, cfg.cohort_size, cfg.seed), fault_spec(cfg)
    out = []
    for r in range(1, cfg.num_rounds + 1):
        kinds = [spec.draw(r, user) for user in sampler.sample(r)]
        out.append({kind: kinds.count(kind) for kind in KINDS})
    return out


def _run(overrides: list[str], out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    summary = run_experiment(compose_config(overrides), out)
    rows = metrics_rows(out)
    return rows, summary


def _check_counts(rows: list[dict[str, Any]], expected: list[dict[str, int]], cohort: int) -> None:
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        failed = sum(want.values())
        for kind, key in COUNTED.items():
            assert row[key] == want[kind], (row["round"], key)
        assert row["clients_ok"] == cohort - failed
        assert row["clients_failed"] == failed
        assert row["round_skipped"] == int(cohort - failed < 1)


@pytest.mark.parametrize(
    "kind",
    [
        "raise",
        "nan",
        pytest.param("die", marks=pytest.mark.slow),
        pytest.param("hang", marks=pytest.mark.slow),
    ],
)
@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_each_fault_kind_is_counted_and_the_run_goes_on(
    run_overrides: list[str], tmp_path: Path, kind: str
) -> None:
    overrides = [
        *run_overrides,
        "num_rounds=4",
        "cohort_size=4",
        "client.faults.probability=0.4",
        f"client.faults.kinds=[{kind}]",
        "client.faults.hang_s=900",
    ]
    if kind == "hang":  # elsewhere the default (round_timeout): a loaded machine is no hang
        overrides += ["simulation.client_timeout=6", "simulation.actor_start_timeout=30"]
    expected = _expected(overrides)
    assert sum(e[kind] for e in expected) > 0, "the seed must make this test exercise the fault"
    assert any(0 < e[kind] < 4 for e in expected), "and leave some rounds with replies"
    started = time.monotonic()
    rows, summary = _run(overrides, tmp_path / kind)
    _check_counts(rows, expected, cohort=4)
    assert time.monotonic() - started < 600, "a hung client (900 s) is never waited for"
    assert summary["rounds"] == 4
    assert np.isfinite(summary["final_val_loss"])
    # The pool recovered: the last round had every healthy client's reply.
    assert rows[-1]["clients_ok"] == 4 - expected[-1][kind]


@pytest.mark.slow
def test_mixed_faults_at_twenty_percent(run_overrides: list[str], tmp_path: Path) -> None:
    overrides = [
        *run_overrides,
        "num_rounds=5",
        "cohort_size=8",
        "simulation.num_supernodes=4",
        "client.faults.probability=0.2",
        "client.faults.hang_s=300",
        "simulation.client_timeout=8",
        "simulation.actor_start_timeout=60",
    ]
    expected = _expected(overrides)
    assert len({k for e in expected for k, n in e.items() if n}) >= 3, "mixed kinds"
    rows, summary = _run(overrides, tmp_path / "mixed")
    _check_counts(rows, expected, cohort=8)
    assert summary["rounds"] == 5 and np.isfinite(summary["final_val_loss"])


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_too_few_replies_skip_the_round_and_dp_still_counts_it(
    run_overrides: list[str], tmp_path: Path
) -> None:
    overrides = [
        *run_overrides,
        "privacy=dp",
        "num_rounds=3",
        "client.faults.probability=1.0",
        "client.faults.kinds=[raise]",
        "client.faults.start_round=2",
        "min_replies=2",
    ]
    rows, _ = _run(overrides, tmp_path / "skip")
    assert [r["round_skipped"] for r in rows] == [0, 1, 1]
    assert [r["clients_ok"] for r in rows] == [3, 0, 0]
    # Model unchanged after round 1: same validation metrics in rounds 1-3.
    assert rows[1]["val_loss"] == rows[0]["val_loss"] == rows[2]["val_loss"]
    epsilons = [r["dp_epsilon"] for r in rows]
    assert epsilons[0] < epsilons[1] < epsilons[2], "the accountant counts skipped rounds"


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_all_updates_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
    run_overrides: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "diverged"
    overrides = [
        *run_overrides,
        "num_rounds=5",
        "checkpoint_every=1",
        "client.faults.probability=1.0",
        "client.faults.kinds=[nan]",
        "client.faults.start_round=3",
    ]
    with pytest.raises(TrainingDiverged, match=r"round 3.*NaN/inf"):
        run_experiment(compose_config(overrides), out)
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["clients_rejected"] == 3 and rows[-1]["clients_ok"] == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] in (2, 3)  # round 3 left the model of round 2 unchanged
    assert all(torch.isfinite(v).all() for v in checkpoint["arrays"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] is True and "round 3" in summary["stop_reason"]
