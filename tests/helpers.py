"""Test helpers: compose the real Hydra config tree, read a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with overrides, as `python -m flair_fl.run` would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of `run_dir/metrics.jsonl`, one dict per logged round, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
