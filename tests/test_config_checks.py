"""Bad configs are refused before anything starts: one line, status 2, no data, no Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flair_fl.errors import ConfigError
from flair_fl.modes.config_checks import (
    BOUNDS,
    CONF_DIR,
    check_config,
    config_problems,
    device_problems,
)
from tests.conftest import CACHE_DIR
from tests.helpers import compose_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["privacy=dp", "strategy=scaffold"], "privacy=dp/dp_adaptive/dp_bmf with"),
        (["privacy=dp_adaptive", "strategy=scaffold"], "with strategy=scaffold"),
        (["privacy=dp_bmf", "strategy=scaffold"], "with strategy=scaffold"),
        (["privacy=dp_bmf", "privacy.bands=60"], "privacy.bands=60: must be in [1, 48]"),
        (["privacy=dp", "aggregation=examples"], "needs aggregation=uniform"),
        (["privacy=dp", "privacy.noise_multiplier=inf"], "privacy.noise_multiplier=inf: must be a"),
        (["privacy=dp", "privacy.clip_norm=inf"], "privacy.clip_norm=inf: must be a finite"),
        (["privacy=dp", "privacy.epsilon=inf"], "privacy.epsilon=inf: must be a finite"),
        (["privacy=dp", "privacy.delta=1"], "privacy.delta=1: must be in (0, 1)"),
        (["privacy=dp_sgd", "privacy.max_grad_norm=0"], "privacy.max_grad_norm=0: must be in (0"),
        (["strategy=fedprox", "strategy.proximal_mu=-0.1"], "strategy.proximal_mu=-0.1: must be"),
        (["strategy=fedadam", "strategy.server.optimizer.betas=[0.9,1.5]"], "betas.1=1.5"),
        (["strategy=fedyogi", "strategy.server.tau=-1"], "strategy.server.tau=-1: must be in (0"),
        (["client.lr=nan"], "client.lr=nan: must be a finite number"),
        (["client.momentum=1"], "client.momentum=1: must be in [0, 1)"),
        (["simulation.round_timeout=inf"], "simulation.round_timeout=inf: must be a finite"),
        (["min_replies=4", "cohort_size=3"], "min_replies=4: must be in [1, 3] (3: cohort_size)"),
        (["server_lr_schedule.warmup_rounds=-1"], "warmup_rounds=-1: must be in [0, inf]"),
        (["strategy=adafedprox", "eval_every=3"], "adaptive_mu.every must be a multiple of"),
        (["strategy=adafedprox", "eval_every=0"], "adaptive_mu.every must be a multiple of"),
        (["strategy=adafedprox", "strategy.adaptive_mu.step=0"], "adaptive_mu.step=0: must be"),
        (["strategy=adafedprox", "strategy.adaptive_mu.metric=val_macro_ap"], "expected one of"),
        (["strategy=adafedprox", "+strategy.adaptive_mu.rate=1"], "adaptive_mu.rate: unknown"),
        (["+client.foo=1"], "client.foo: unknown key (known: batch_size,"),
        (["+client.faults.rate=0.5"], "client.faults.rate: unknown key"),
        (["+eval.every=3"], "eval.every: unknown key"),
        (["+num_round=3"], "num_round: unknown key"),
        (["+simulation.gpus=1"], "simulation.gpus: unknown key"),
        (["device=tpu"], "device='tpu': expected one of auto, cpu, cuda"),
        (["eval.precision=fp16"], "eval.precision='fp16': expected one of fp32, bf16"),
        (["eval.data_on=gpu"], "eval.data_on='gpu': expected one of auto, device, host"),
        (["eval.overlap=yes"], "eval.overlap='yes': expected one of auto, true, false"),
        (["mode=central", "mode.optimizer.lr=0"], "mode.optimizer.lr=0: must be in (0, inf]"),
    ],
)
def test_each_bad_config_is_refused_naming_the_key(overrides: list[str], needle: str) -> None:
    cfg = compose_config(overrides)

    problems = config_problems(cfg)

    assert any(needle in p for p in problems), problems


@pytest.mark.parametrize("privacy", ["dp", "dp_sgd"])
def test_central_mode_refuses_differential_privacy_by_type_before_the_data(
    privacy: str, tmp_path: Path
) -> None:
    """mode=central refuses any mechanism but NoPrivacy (by the built object's type)."""
    from flair_fl.modes.centralized import run_central

    cfg = compose_config(["mode=central", f"privacy={privacy}"])

    with pytest.raises(ConfigError, match="mode=central trains without differential privacy"):
        run_central(cfg, tmp_path)
    assert not (tmp_path / "config_resolved.yaml").exists()  # written once the data is open


def test_eval_overlap_accepts_the_booleans_yaml_gives() -> None:
    # Prepare: `eval.overlap=true` / `false` arrive from Hydra as bools, not strings
    configs = [compose_config([f"eval.overlap={v}"]) for v in ("true", "false", "auto")]

    # Execute
    problems = [config_problems(cfg) for cfg in configs]

    # Assert
    assert problems == [[], [], []]


def test_cohort_bound_says_where_it_comes_from() -> None:
    cfg = compose_config(["cohort_size=100"])

    with pytest.raises(ConfigError) as err:
        check_config(cfg, {"train users": 32})
    assert str(err.value) == "cohort_size=100: must be in [1, 32] (32: train users)"


def test_every_problem_is_listed_at_once_in_one_line() -> None:
    cfg = compose_config(["client.lr=-1", "+client.foo=1", "num_rounds=0"])

    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert all(k in message for k in ("client.lr=-1", "client.foo", "num_rounds=0"))


def _numeric_keys(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _numeric_keys(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _numeric_keys(v, f"{prefix}{i}.")]
    number = isinstance(node, int | float) and not isinstance(node, bool)
    return [prefix.rstrip(".")] if number else []


def test_every_numeric_key_of_conf_has_a_bound() -> None:
    # Prepare: the numeric keys every file under conf/ sets, at their place in a run config
    keys = set()
    for path in CONF_DIR.rglob("*.yaml"):
        group = path.parent.relative_to(CONF_DIR).as_posix()
        top = group.split("/")[0]
        if top in ("hparams_search", "experiment", "debug", "logger", "hydra"):
            continue  # sweeper/launcher settings (Hydra's schemas check them), and presets
        node = OmegaConf.to_container(OmegaConf.load(path))
        keys.update(_numeric_keys(node, "" if group == "." else f"{group}."))
    keys = {k for k in keys if not k.startswith("hydra.")}

    # Assert
    bounded = {b.key for b in BOUNDS}
    assert keys - bounded == set()


def test_gpu_settings_without_a_gpu_are_refused() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "device=cuda: no CUDA GPU" in " ".join(device_problems(compose_config(["device=cuda"])))
    gpu = device_problems(compose_config(["simulation=gpu"]))
    assert gpu and "num_gpus=0.25: this machine has 0 CUDA GPU(s)" in gpu[0]
    attached = compose_config(["simulation=cluster", "simulation.address=10.0.0.1:6379"])
    assert device_problems(attached) == []  # the cluster's GPUs are not this machine's


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("privacy=dp strategy=scaffold", "with strategy=scaffold"),
        ("privacy=dp privacy.noise_multiplier=inf", "privacy.noise_multiplier=inf"),
        ("+client.warmup=3", "client.warmup: unknown key"),
        ("simulation=gpu", "num_gpus=0.25"),
        ("data.binary_label=unicorn", "data.binary_label='unicorn' is not a coarse label"),
    ],
)
def test_cli_refuses_in_one_line_with_status_2_before_ray(
    override: str, needle: str, tmp_path: Path
) -> None:
    if "gpu" in override:
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    ray_dir = tmp_path / "ray"

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flair_fl.run",
            "debug=tiny",
            *override.split(),
            f"data.cache_dir={CACHE_DIR}",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"+simulation.backend.init_args._temp_dir={ray_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flair-fl: error: ") and needle in lines[0]
    assert not ray_dir.exists()  # Ray never started


def test_a_run_shorter_than_the_warm_up_is_accepted() -> None:
    # A one-round smoke run of a paper preset (warm-up 30) is legitimate; schedule.py warns
    cfg = compose_config(["experiment=fl_r_17", "num_rounds=1"])

    problems = config_problems(cfg)

    assert not any("warmup_rounds" in problem for problem in problems), problems
