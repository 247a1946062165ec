"""Paper presets, the centralized mode, SCAFFOLD's per-user state and the binary mode, end to
end through the real configs (and, for FL, the real Flower simulation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from flair_fl.federated.sampling import CohortSampler
from flair_fl.run import execute
from tests.helpers import CONF_DIR, compose_config

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
PAPER = {"fl_r_17", "fl_f_17", "fl_r_1628", "fl_f_1628", "c_r_17", "c_f_17"}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-format ResNet18 state dict (random weights: ImageNet's can't be fetched)."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    return path


def test_all_paper_presets_exist() -> None:
    assert set(PRESETS) >= PAPER


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_preset_has_the_reference_hyperparameters(preset: str) -> None:
    cfg = compose_config([f"experiment={preset}"])

    assert cfg.data._target_.endswith("hdf5_data") and cfg.data.input_size == 224
    assert cfg.data.label_set == ("fine" if preset.endswith("1628") else "coarse")
    assert ("pretrained" in cfg.model._target_) == ("_f_" in preset)
    if preset.startswith("fl_"):
        assert (cfg.num_rounds, cfg.cohort_size, cfg.eval_every) == (5000, 200, 20)
        assert (cfg.client.epochs, cfg.client.batch_size, cfg.client.lr) == (2, 16, 0.01)
        assert (cfg.client.grad_clip, cfg.client.max_images, cfg.aggregation) == (
            10,
            512,
            "uniform",
        )
        assert cfg.strategy.server.lr == 0.1
        assert list(cfg.strategy.server.optimizer.betas) == [0.9, 0.99]
        assert cfg.strategy.server.optimizer.eps == 0.01
        schedule = dict(cfg.server_lr_schedule)
        assert schedule["kind"] == "polynomial_decay_with_warmup"
        assert (schedule["warmup_rounds"], schedule["training_steps"]) == (30, 5000)
        assert (schedule["lr_end"], schedule["power"]) == (0.02, 1.0)
    else:
        assert cfg.mode._target_.endswith("run_central")
        assert (cfg.mode.batch_size, cfg.mode.optimizer.lr, cfg.mode.grad_clip) == (512, 1e-4, 10)


@pytest.mark.slow  # ResNet18 through Ray for each preset: ~15-25 s each on 2 cores
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_one_round_on_debug_data(
    preset: str, run_overrides: list[str], weights_file: Path, tmp_path: Path
) -> None:
    overrides = [
        f"experiment={preset}",
        *run_overrides,
        "data=synthetic",
        "num_rounds=1",
        "mode.epochs=1" if preset.startswith("c_") else "cohort_size=3",
        "eval.batch_size=64",
    ]
    if preset.startswith("c_"):
        overrides += ["mode.batch_size=32"]
    if "_f_" in preset:
        overrides += [f"model.pretrained={weights_file}"]
    cfg = compose_config(overrides)

    summary = execute(cfg, str(tmp_path))

    assert summary["rounds"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_scaffold_user_state_survives_rounds_without_the_user(
    run_overrides: list[str], tmp_path: Path
) -> None:
    cfg = compose_config([*run_overrides, "strategy=scaffold", "num_rounds=3"])

    execute(cfg, str(tmp_path))

    from flair_fl.data.source import FederatedData  # the run's own population, in order
    from flair_fl.modes.build import build

    data: FederatedData = build(cfg.data, "data")
    train_users = list(data.reader.population("train"))
    sampler = CohortSampler(train_users, cfg.cohort_size, cfg.seed)
    rounds = {r: set(sampler.sample(r)) for r in (1, 2, 3)}
    store = tmp_path / "client_state" / "scaffold"
    assert {p.stem for p in store.glob("*.pt")} == set().union(*rounds.values())
    only_first = rounds[1] - rounds[2] - rounds[3]
    assert only_first, "seeded draw expected to leave some round-1 user out of rounds 2-3"
    files = {p.stem: p.stat().st_mtime for p in store.glob("*.pt")}
    latest_first_round = max(files[u] for u in only_first)
    later = [files[u] for u in rounds[3]]
    assert all(t > latest_first_round for t in later)  # round-1 files kept, not rewritten
    state = torch.load(store / f"{sorted(only_first)[0]}.pt")
    assert any(v.abs().sum() > 0 for v in state.values())


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_binary_label_mode_trains_a_single_output(run_overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_config([*run_overrides, "data.binary_label=structure"])

    summary = execute(cfg, str(tmp_path))

    assert torch.load(tmp_path / "model_final.pt")["head.weight"].shape[0] == 1
    assert summary["final_val_macro_ap"] == pytest.approx(summary["final_val_micro_ap"])
