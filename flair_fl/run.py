"""Entry point: `python -m flair_fl.run [group=option ...] [key=value ...]` (Hydra).

Returns the best val macro AP over trained rounds, the metric Hydra sweepers maximise.
Only Hydra and the light modules are imported up front: `--help` and a bad value answer
without loading torch, Ray or Flower (seconds of imports); the run's modules are imported once
the config passed its checks.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from flair_fl.artifacts.resume import resume_config
from flair_fl.artifacts.run_dir import report_finished, run_dir_lock
from flair_fl.modes.config_checks import validate_run_config
from flair_fl.services import stopping
from flair_fl.services.job_failure import job_failed

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# conf/hydra/launcher/submitit_*.yaml are checked against the submitit plugin's schema of the
# same name (wanted: typos in hydra.launcher.* are errors); Hydra warns of that at every sweep.
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema")


def execute(cfg: DictConfig, output_dir: str) -> dict[str, Any]:
    """Run the configured mode (federated or central); returns its summary."""
    validate_run_config(cfg)  # bad values fail here, before torch and Flower are imported
    from flair_fl.modes.build import build

    runner = build(cfg.mode, "mode")
    summary: dict[str, Any] = runner(cfg=cfg, output_dir=output_dir)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    job_dir = HydraConfig.get().runtime.output_dir
    # A resumed run writes into the run it resumes (a missing one is refused by the run).
    run_dir = Path(str(cfg.resume)) if cfg.get("resume") else Path(job_dir)
    with stopping.handling():
        try:
            with run_dir_lock(run_dir) if run_dir.is_dir() else contextlib.nullcontext():
                if cfg.get("resume"):
                    if (done := report_finished(run_dir)) is not None:  # before recomposing
                        return float(done.get("best_val_macro_ap", float("-inf")))
                    cfg = resume_config(cfg)
                summary = execute(cfg, job_dir)
        except Exception as err:  # recorded, cleaned up; a sweep goes on (see job_failure.py)
            return job_failed(err, Path(job_dir), bool(cfg.get("sweep_continue_on_error", True)))
    # No trained round evaluated (e.g. a budget stop before round 1): nothing to score.
    return float(summary.get("best_val_macro_ap", float("-inf")))


if __name__ == "__main__":
    main()
