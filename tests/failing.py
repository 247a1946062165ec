"""Config targets that fail on purpose, for the logger-guard and sweep tests.

Referenced from Hydra overrides (`+logger.broken._target_=tests.failing.BrokenLogger`,
`mode._target_=tests.failing.crash_after_start`), also in `python -m flair_fl.run`
subprocesses started from the repo root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flair_fl.loggers import open_loggers
from flair_fl.modes.build import build_loggers
from flair_fl.modes.federated import run_experiment


class BrokenLogger:
    """A logger whose every call after construction raises."""

    def __init__(self, out_dir: str | Path, run_config: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir)

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        raise RuntimeError(f"broken logger: round {server_round}")

    def log_summary(self, summary: dict[str, Any]) -> None:
        raise RuntimeError("broken logger: summary")

    def close(self) -> None:
        raise RuntimeError("broken logger: close")


def crash_after_start(cfg: DictConfig, output_dir: str) -> dict[str, Any]:
    """A federated run that dies after its loggers and Ray are up (as a mid-run crash)."""
    import ray

    loggers = build_loggers(cfg, Path(output_dir))
    for logger in loggers:
        logger.log_round(1, {"train_loss": 1.0})
    ray.init(**OmegaConf.to_container(cfg.simulation.backend.init_args, resolve=True))  # type: ignore[arg-type]
    raise RuntimeError("boom: simulated crash in round 2")


def run_if_clean(cfg: DictConfig, output_dir: str) -> dict[str, Any]:
    """`run_experiment`, after checking that no earlier job left Ray up or a logger open."""
    import ray

    if ray.is_initialized():
        raise AssertionError("an earlier job left Ray initialized")
    if left_open := open_loggers():
        raise AssertionError(f"an earlier job left loggers open: {[x.name for x in left_open]}")
    return run_experiment(cfg, output_dir)
