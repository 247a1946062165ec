"""End-to-end runs through the real Hydra configs and the real Flower simulation (Ray)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
from flwr.app import ArrayRecord
from hydra.errors import MissingConfigException
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from flair_fl.errors import ConfigError, FlairFormatError
from flair_fl.federated.round import is_measurement
from flair_fl.federated.sampling import CohortSampler
from flair_fl.models.params import trainable_state
from flair_fl.modes.federated import run_experiment
from tests.helpers import CONF_DIR, compose_config, metrics_rows

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {
    "round",
    "train_loss",
    "clients_ok",
    "clients_failed",
    "round_time_s",
    "val_loss",
    "val_macro_ap",
    "val_micro_ap",
    "val_macro_f1",
    "val_micro_f1",
}


def _group_options() -> list[tuple[str, str]]:
    return [
        (group.name, option.stem)
        for group in sorted(CONF_DIR.iterdir())
        if group.is_dir()
        for option in sorted(group.glob("*.yaml"))
    ]


@pytest.mark.parametrize(("group", "option"), _group_options())
def test_every_group_option_composes(group: str, option: str) -> None:
    cfg = compose_config([f"{group}={option}"])

    targets = [node["_target_"] for node in _target_nodes(OmegaConf.to_container(cfg))]
    assert targets, "a composed run config always has _target_ nodes"
    for target in targets:
        assert callable(get_method(target))  # every _target_ resolves to a real callable


def _target_nodes(node: object) -> list[dict[str, object]]:
    if isinstance(node, dict):
        found = [node] if "_target_" in node else []
        return found + [n for v in node.values() for n in _target_nodes(v)]
    if isinstance(node, list):
        return [n for v in node for n in _target_nodes(v)]
    return []


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_end_to_end_run_writes_complete_metrics(
    strategy: str, run_overrides: list[str], tmp_path: Path
) -> None:
    cfg = compose_config([*run_overrides, f"strategy={strategy}"])

    summary = run_experiment(cfg, tmp_path)

    rows = metrics_rows(tmp_path)
    assert [r["round"] for r in rows] == list(range(1, cfg.num_rounds + 1))
    for row in rows:  # debug=tiny evaluates every round
        assert set(row) >= METRIC_KEYS, METRIC_KEYS - set(row)
        assert row["clients_ok"] == cfg.cohort_size and row["clients_failed"] == 0
    csv_lines = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_lines) == cfg.num_rounds + 1  # header + one line per round
    assert summary["rounds"] == cfg.num_rounds
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == cfg.num_rounds
    assert {"final_test_macro_ap", "final_val_macro_ap", "untrained_val_macro_ap"} <= set(summary)
    assert (tmp_path / "config_resolved.yaml").is_file()
    state = torch.load(tmp_path / "model_final.pt")
    assert any(not torch.equal(state[k], v) for k, v in _initial_state(cfg).items())


def _initial_state(cfg: object) -> dict[str, torch.Tensor]:
    from flair_fl.services.seeds import derive_seed

    data = instantiate(cfg.data)  # type: ignore[attr-defined]
    torch.manual_seed(derive_seed(cfg.seed, "model-init"))  # type: ignore[attr-defined]
    return dict(instantiate(cfg.model)(num_classes=data.num_labels).state_dict())  # type: ignore[attr-defined]


def test_training_beats_the_untrained_model(run_overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_config(
        [
            *run_overrides,
            "data.num_users=200",
            "data.image_size=32",
            "data.input_size=32",
            "num_rounds=15",
            "cohort_size=10",
            "eval_every=15",
            "client.epochs=5",
            "client.batch_size=8",
            "eval.test_at_end=false",
            "simulation.num_supernodes=4",
        ]
    )

    summary = run_experiment(cfg, tmp_path)

    gain = summary["final_val_macro_ap"] - summary["untrained_val_macro_ap"]
    assert gain > 0.05, summary
    assert summary["final_val_micro_ap"] > summary["untrained_val_micro_ap"] + 0.1, summary


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_same_seed_same_run_and_other_seed_other_users(
    run_overrides: list[str], tmp_path: Path
) -> None:
    runs = []
    for name in ("a", "b"):
        cfg = compose_config([*run_overrides, "seed=7"])
        run_experiment(cfg, tmp_path / name)
        runs.append(metrics_rows(tmp_path / name))

    for row_a, row_b in zip(*runs, strict=True):
        for key in (k for k in row_a if not is_measurement(k)):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-5, abs=1e-6), key
    users = [f"u{i}" for i in range(50)]
    assert CohortSampler(users, 5, 7).sample(3) == CohortSampler(users, 5, 7).sample(3)
    assert CohortSampler(users, 5, 7).sample(3) != CohortSampler(users, 5, 8).sample(3)
    assert CohortSampler(users, 5, 7).sample(3) != CohortSampler(users, 5, 7).sample(4)


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_only_trainable_parameters_travel(run_overrides: list[str], tmp_path: Path) -> None:
    # BatchNorm running statistics change during local training (train mode) but are
    # buffers: they must come back from no client and stay at their initial values.
    cfg = compose_config([*run_overrides, "model.norm=batch"])
    initial = _initial_state(cfg)

    run_experiment(cfg, tmp_path)

    final = torch.load(tmp_path / "model_final.pt")
    buffers = [k for k in initial if "running_" in k or "num_batches_tracked" in k]
    assert buffers
    for key in buffers:
        assert torch.equal(final[key], initial[key]), key
    weights = [k for k in initial if k.endswith(".weight")]
    assert any(not torch.equal(final[k], initial[k]) for k in weights)


def test_sampler_draws_without_replacement() -> None:
    sampler = CohortSampler([f"u{i}" for i in range(20)], 20, seed=1)

    for server_round in range(1, 5):
        assert sorted(sampler.sample(server_round)) == sorted(sampler.user_ids)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("cohort_size=100000", "cohort_size=100000: must be in [1, "),
        ("num_rounds=0", "num_rounds=0: must be in [1, inf]"),
        ("client.lr=-0.5", "client.lr=-0.5: must be in (0, inf]"),
        ("client.batch_size=abc", "client.batch_size='abc': expected int"),
        ("aggregation=median", "aggregation='median'"),
        ("data.num_users=2", "data: num_users must be >= 3"),
        ("min_replies=4", "min_replies=4: must be in [1, 3]"),
        ("simulation.client_timeout=0", "simulation.client_timeout=0: must be in (0, inf]"),
        ("simulation.transport=carrier-pigeon", "simulation.transport='carrier-pigeon'"),
        ("client.faults.probability=2", "client.faults.probability=2: must be in [0, 1]"),
        ("client.faults.kinds=[explode]", "client.faults.kinds: unknown ['explode']"),
        ("eval.overlap=sometimes", "eval.overlap='sometimes': expected one of auto, true"),
        ("eval.data_on=disk", "eval.data_on='disk': expected one of auto, device, host"),
        ("eval.precision=fp16", "eval.precision='fp16': expected one of fp32, bf16"),
    ],
)
def test_bad_config_value_names_the_key(
    override: str, needle: str, run_overrides: list[str], tmp_path: Path
) -> None:
    cfg = compose_config([*run_overrides, override])

    with pytest.raises(ConfigError) as err:
        run_experiment(cfg, tmp_path)
    assert needle in str(err.value)


def test_unknown_group_option_lists_the_choices() -> None:
    with pytest.raises(MissingConfigException) as err:
        compose_config(["strategy=fedmagic"])
    assert "fedmagic" in str(err.value) and "fedavg" in str(err.value)


def test_missing_real_dataset_says_how_to_create_it(tmp_path: Path) -> None:
    cfg = compose_config(["data=flair", f"data.path={tmp_path / 'nope.hdf5'}"])

    with pytest.raises(FlairFormatError) as err:
        run_experiment(cfg, tmp_path)
    assert "prepare_flair.py" in str(err.value) and "download_flair.py" in str(err.value)


def test_hdf5_without_val_split_is_refused(tiny_hdf5: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "no_val.hdf5"
    damaged.write_bytes(tiny_hdf5.read_bytes())
    with h5py.File(damaged, "a") as h5:
        del h5["val"]
    cfg = compose_config(["data=flair", f"data.path={damaged}", "data.input_size=32"])

    with pytest.raises(FlairFormatError) as err:
        run_experiment(cfg, tmp_path / "out")
    assert "'val' split" in str(err.value)


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_multirun_sweep_writes_one_dir_per_job(run_overrides: list[str], tmp_path: Path) -> None:
    # Prepare: two jobs whose cohort has failing clients (seeded: 2 of 3 raise in round 1)
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "flair_fl.run",
        "-m",
        "strategy=fedavg,fedprox",
        "num_rounds=1",
        "client.faults.probability=0.3",
        "client.faults.kinds=[raise]",
        f"hydra.sweep.dir={sweep_dir}",
        *run_overrides,
    ]

    # Execute
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )

    # Assert: one dir per job, and a quiet console (see _check_quiet_console)
    assert done.returncode == 0, done.stderr[-3000:]
    job_dirs = sorted(p.parent for p in sweep_dir.glob("*/metrics.jsonl"))
    assert len(job_dirs) == 2
    strategies = {
        OmegaConf.load(d / "config_resolved.yaml").strategy.server._target_ for d in job_dirs
    }
    assert strategies == {"flwr.serverapp.strategy.FedAvg", "flwr.serverapp.strategy.FedProx"}
    _check_quiet_console(done.stdout + done.stderr, job_dirs)


def _check_quiet_console(console: str, job_dirs: list[Path]) -> None:
    """No ANSI codes and no third-party INFO lines; per job: one line per failed client (its
    traceback in clients.log), no line twice, the metrics' elapsed clock."""
    rows = [metrics_rows(d) for d in job_dirs]
    failed = [sum(int(r["clients_failed"]) for r in job) for job in rows]  # type: ignore[call-overload]
    assert all(failed), "the seeded faults must make clients fail in every job"
    assert "\x1b[" not in console and "Traceback" not in console
    log_lines = [line for line in console.splitlines() if line.startswith("[")]
    assert all("[flair_fl" in line for line in log_lines if "][INFO] - " in line), log_lines
    jobs = re.split(r"\n.*#\d+ : .*\n", console)[1:]  # Hydra's "#<job> : <overrides>" lines
    assert len(jobs) == len(job_dirs)
    for job, job_dir, job_rows, n_failed in zip(jobs, job_dirs, rows, failed, strict=True):
        lines = [re.sub(r"^\[[^]]*\]", "", line) for line in job.splitlines() if line.strip()]
        assert len(lines) == len(set(lines)), "a message printed twice"
        assert len([line for line in lines if re.search(r"client \d+ failed", line)]) == n_failed
        for name in ("run.log", "clients.log"):
            assert "\x1b[" not in (job_dir / name).read_text(), name
        assert "InjectedFault" in (job_dir / "clients.log").read_text()
        elapsed = round(float(job_rows[-1]["elapsed_s"]))  # type: ignore[arg-type]
        assert f"elapsed {elapsed // 60:02d}:{elapsed % 60:02d}" in job


def test_central_evaluation_halves_its_batch_on_gpu_out_of_memory(
    run_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here, so the CUDA out-of-memory error is raised by a wrapper around the real
    evaluation for batches above 4 (a test double only for what cannot run here)."""
    import flair_fl.learning.evaluator as central
    from flair_fl.modes.build import build, make_model

    cfg = compose_config(run_overrides)
    data = build(cfg.data, "data")
    model = make_model(cfg, data.num_labels)
    evaluator = central.CentralEvaluator(model, data, 64, torch.device("cpu"))
    expected = evaluator(ArrayRecord(trainable_state(model)), "val")
    real, batches = central.evaluate, []

    def tight_memory(*args: Any) -> Any:
        batches.append(args[3])
        if args[3] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(central, "evaluate", tight_memory)
    assert evaluator(ArrayRecord(trainable_state(model)), "val") == pytest.approx(expected)
    assert batches == [64, 32, 16, 8, 4] and evaluator.batch_size == 4
