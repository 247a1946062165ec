"""`resume=<run dir>`: rebuild the run's config from its own command-line overrides.

`python -m flair_fl.run resume=outputs/runs/X` continues X with X's settings: the overrides
Hydra saved in X/.hydra/overrides.yaml are composed again, with any override given now on top
(harmless ones such as `simulation=gpu`; one that changes results is refused by the
experiment with the differing keys listed).
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_config(cfg: DictConfig) -> DictConfig:
    """The composed config of the run being resumed (current overrides win)."""
    saved = Path(str(cfg.resume)) / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return cfg  # not a Hydra run dir: the experiment compares configs key by key
    original = [str(o) for o in OmegaConf.load(saved)]
    current = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    merged = {_key(o): o for o in original + current if not _key(o).startswith("hydra.")}
    return compose(config_name="config", overrides=list(merged.values()))
