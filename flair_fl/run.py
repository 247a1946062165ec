"""Entry point: `python -m flair_fl.run [group=option ...] [key=value ...]` (Hydra).

Returns the best val macro AP, the metric Hydra sweepers maximise.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from flair_fl.config_checks import ConfigError
from flair_fl.data.raw import FlairFormatError
from flair_fl.experiment import run_experiment

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        summary = run_experiment(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, FlairFormatError) as err:
        print(f"flair-fl: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return float(summary["best_val_macro_ap"])


if __name__ == "__main__":
    main()
