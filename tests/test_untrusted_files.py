"""Nothing a run reads from disk runs code: checkpoints, model and weight files, client state
and a run directory's saved overrides are data, checked before use (issue 15, item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvgM, FedYogi
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from flair_fl.algorithms.fedopt import ServerOptimizer
from flair_fl.algorithms.scaffold import Scaffold
from flair_fl.artifacts.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    save_checkpoint,
)
from flair_fl.artifacts.resume import _compose, _group_options
from flair_fl.artifacts.resume_overrides import merge_resume_overrides
from flair_fl.errors import ConfigError
from flair_fl.federated.contract import ServerStrategy, server_strategy
from flair_fl.federated.user_state import UserStateStore, state_file_name
from flair_fl.models.resnet import resnet18_pretrained
from tests.helpers import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates the directory `marker`: the side effect that must not happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def plant(path: Path, marker: Path, wrap: bool = True) -> None:
    """A torch file whose unpickling runs `os.mkdir(marker)`; checked to work unguarded."""
    torch.save({"round": 1, "payload": Payload(marker)} if wrap else Payload(marker), path)
    torch.load(path, weights_only=False)  # the payload is real: it runs when unguarded
    assert marker.is_dir()
    marker.rmdir()


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flair_fl.run", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("flair-fl: error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


# --- checkpoints -----------------------------------------------------------------------


def test_planted_pickle_in_the_checkpoint_does_not_run_on_resume(tmp_path: Path) -> None:
    # Prepare
    run_dir, marker = tmp_path / "run", tmp_path / "owned"
    run_dir.mkdir()
    plant(run_dir / CHECKPOINT_NAME, marker)

    # Execute: the real entry point, as a user (or a scheduler) resumes
    done = run_cli(f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'new'}")

    # Assert
    assert not marker.exists()
    assert_one_line_error(done, str(run_dir / CHECKPOINT_NAME), "refused")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", "half"])
def test_truncated_or_empty_checkpoint_is_one_clear_error(
    content: bytes | str, tmp_path: Path
) -> None:
    # Prepare: an empty file, garbage, or the first half of a real checkpoint
    path = tmp_path / CHECKPOINT_NAME
    if content == "half":
        save_checkpoint({"round": 1, "arrays": {"w": torch.ones(1000)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]

    # Execute
    with pytest.raises(ConfigError, match="cannot be read") as err:
        load_checkpoint(tmp_path)

    # Assert
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_without_its_keys_is_refused(tmp_path: Path) -> None:
    torch.save({"round": "2", "arrays": {}}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ConfigError, match="'round' is missing or not a int"):
        load_checkpoint(tmp_path)


def _array_record(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 3), value, dtype=np.float32))})


def _stateful_strategies() -> dict[str, ServerStrategy]:
    """Each kind of server state a checkpoint holds, as the strategies hold it mid-run."""
    yogi = FedYogi()
    yogi.m_t = {"w": np.full((2, 3), 0.5, dtype=np.float32)}
    yogi.v_t = {"w": np.full((2, 3), 0.25, dtype=np.float32)}
    yogi.current_arrays = {"w": np.ones((2, 3), dtype=np.float32)}  # a dict of numpy arrays
    avgm = FedAvgM()
    avgm.momentum_vector = [np.full((2, 3), 0.1, dtype=np.float32)]  # a list of numpy arrays
    avgm.current_arrays = _array_record(2.0)  # an ArrayRecord
    scaffold = Scaffold(population_size=10)
    scaffold.control = {"w": np.full((2, 3), -1.0)}
    adam = ServerOptimizer(torch.optim.Adam, lr=0.1)  # torch optimizer state after a step
    adam.params = {"w": torch.nn.Parameter(torch.ones(2, 3))}
    adam.optimizer = torch.optim.Adam(list(adam.params.values()), lr=0.1)
    adam.params["w"].grad = torch.full((2, 3), 0.3)
    adam.optimizer.step()
    return {
        "fedyogi": server_strategy(yogi),
        "fedavgm": server_strategy(avgm),
        "scaffold": scaffold,
        "fedadam": adam,
    }


def test_every_strategy_state_round_trips_through_a_weights_only_checkpoint(
    tmp_path: Path,
) -> None:
    # Prepare
    fresh: dict[str, ServerStrategy] = {
        "fedyogi": server_strategy(FedYogi()),
        "fedavgm": server_strategy(FedAvgM()),
        "scaffold": Scaffold(10),
        "fedadam": ServerOptimizer(torch.optim.Adam, lr=0.1),
    }
    for name, strategy in _stateful_strategies().items():
        state = {
            "round": 3,
            "arrays": {"w": torch.ones(2, 3)},
            "strategy": strategy.state_dict(),
            "privacy": {"history": {1: {"clip_norm": np.float64(0.5), "received": np.int64(4)}}},
            "tracker": {
                "best": {"round": 2, "val_macro_ap": np.float32(0.25)},
                "best_arrays": None,
            },
            "initial_val": {"val_macro_ap": 0.1},
            "config": {"seed": 0},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        }
        save_checkpoint(state, tmp_path / CHECKPOINT_NAME)

        # Execute
        torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # loads as data alone
        loaded = load_checkpoint(tmp_path)
        fresh[name].load_state_dict(loaded["strategy"])

        # Assert: the restored strategy holds what the original did, of the same types
        for key, value in strategy.state_dict().items():
            got = fresh[name].state_dict()[key]
            assert type(got) is type(value), (name, key)
            if isinstance(value, ArrayRecord):
                assert np.array_equal(got["w"].numpy(), value["w"].numpy())
            elif isinstance(value, list):
                assert all(np.array_equal(a, b) for a, b in zip(got, value, strict=True))
            elif key == "server_optimizer":
                assert torch.equal(got["params"]["w"], value["params"]["w"])
                step = got["optimizer"]["state"][0]["exp_avg"]
                assert torch.equal(step, value["optimizer"]["state"][0]["exp_avg"])
            else:
                assert all(np.array_equal(got[k], value[k]) for k in value), (name, key)
        assert loaded["privacy"]["history"][1] == {"clip_norm": 0.5, "received": 4}
        assert np.array_equal(loaded["rng"]["numpy"][1], np.random.get_state()[1])


def test_unsaveable_state_fails_at_save_not_at_resume(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"checkpoint\.strategy\.x: a Payload"):
        save_checkpoint({"strategy": {"x": Payload(tmp_path / "m")}}, tmp_path / CHECKPOINT_NAME)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


# --- model files and client state ------------------------------------------------------


def test_planted_pickle_in_pretrained_weights_does_not_run(tmp_path: Path) -> None:
    # Prepare
    weights, marker = tmp_path / "resnet18.pth", tmp_path / "owned"
    plant(weights, marker, wrap=False)

    # Execute
    with pytest.raises(ValueError, match="refused") as err:
        resnet18_pretrained(17, pretrained=str(weights))

    # Assert
    assert not marker.exists()
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "content",
    [[torch.ones(2)], torch.ones(3), {"conv1.weight": [1, 2]}, {"conv1.weight": torch.ones(3)}],
    ids=["list", "tensor", "dict-of-lists", "wrong-shapes"],
)
def test_pretrained_file_that_is_no_resnet18_state_dict_is_one_line(
    content: object, tmp_path: Path
) -> None:
    weights = tmp_path / "w.pth"
    torch.save(content, weights)
    with pytest.raises(ValueError, match="state dict") as err:
        resnet18_pretrained(17, pretrained=str(weights))
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


def test_whole_pickled_model_as_weights_is_refused_through_the_cli(tmp_path: Path) -> None:
    # Prepare: `torch.save(model)` (not its state_dict) pickles classes
    weights = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), weights)

    # Execute
    done = run_cli(
        "debug=tiny",
        "model=resnet18_pretrained",
        f"model.pretrained={weights}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )

    # Assert
    assert_one_line_error(done, "model.pretrained", str(weights))


def test_client_state_is_loaded_as_data_and_named_injectively(tmp_path: Path) -> None:
    # Prepare
    store = UserStateStore(tmp_path, "scaffold")
    marker = tmp_path / "owned"
    plant(store.dir / state_file_name("u1"), marker, wrap=False)
    ids = ["a/b", "a_b", "a%2Fb", "..", ".", "", "x" * 300, "59769174@N00"]

    # Execute
    with pytest.raises(ConfigError, match="refused"):
        store.load("u1")
    names = [state_file_name(i) for i in ids]

    # Assert
    assert not marker.exists()
    assert len(set(names)) == len(ids)
    assert all("/" not in n and n not in (".", "..") and len(n) < 255 for n in names)
    assert state_file_name("59769174@N00") == "59769174@N00.pt"


# --- the saved overrides of resume= ----------------------------------------------------


@pytest.fixture
def hydra_conf() -> object:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def merge(saved: list[str], current: list[str] | None = None) -> list[str]:
    return merge_resume_overrides(
        saved, current or [], "run/.hydra/overrides.yaml", _group_options, _compose
    )


HOSTILE = {
    "+model.x._target_=os.system": "special key",
    "strategy.server.optimizer._target_=builtins.exec": "special key",
    "strategy.server.optimizer={_target_: os.system, command: id}": "special key",
    "model._partial_=false": "special key",
    "model._args_=[id]": "special key",
    "+client.evil=1": "no key client.evil",
    "++client.evil=1": "no key client.evil",
    "client.evil=1": "no key client.evil",
    "client.faults={probability: 0.1, evil: 1}": "client.faults.evil",
    "client.lr=${oc.env:HOME}": "interpolation",
    "strategy.server.optimizer='${oc.create:\"{_target_: os.system}\"}'": "interpolation",
    "model=../../../tmp/evil": "not an option",
    "logger=[csv,evil]": "not an option",
    "model@client=smallcnn": "package",
    "simulation.address=evil.example:6379": "connects",
    "+simulation.backend.init_args.runtime_env={pip: [evil]}": "connects",
    "seed=1,2": "sweep",
    "client.lr=[0.1": "not a Hydra override",
}


@pytest.mark.parametrize("entry", list(HOSTILE))
def test_hostile_saved_override_is_refused_naming_it(entry: str, hydra_conf: object) -> None:
    with pytest.raises(ConfigError) as err:
        merge(["debug=tiny", entry])
    assert repr(entry) in str(err.value) and HOSTILE[entry] in str(err.value)


def test_the_config_s_own_keys_and_groups_are_accepted(hydra_conf: object) -> None:
    saved = [
        "strategy=fedprox",
        "strategy.proximal_mu=0.1",  # a key of the chosen group
        "logger=[csv,wandb]",
        "~logger.plots",
        "debug=tiny",
        "client.faults={probability: 0.1}",
        "hydra.run.dir=/elsewhere",  # Hydra's own settings are dropped
        "hydra/launcher=basic",
        "+model.x._target_=tests.failing.BrokenLogger",  # given again now: the user's
    ]
    current = ["+model.x._target_=tests.failing.BrokenLogger", "client.lr=0.05"]
    assert merge(saved, current) == [*saved[:6], *current]


def test_hostile_overrides_yaml_is_refused_by_the_cli_before_anything_runs(
    tmp_path: Path,
) -> None:
    # Prepare: a run dir whose overrides would instantiate os.mkdir(marker) as a logger
    run_dir, marker = tmp_path / "run", tmp_path / "owned"
    (run_dir / ".hydra").mkdir(parents=True)
    entries = [
        "debug=tiny",
        "+logger.evil._target_=os.mkdir",
        f"+logger.evil.path={marker}",
    ]
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(entries))

    # Execute
    done = run_cli(f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'new'}")

    # Assert
    assert not marker.exists()
    assert_one_line_error(done, "+logger.evil._target_=os.mkdir", "refused")
