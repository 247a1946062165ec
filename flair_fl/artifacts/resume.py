"""`resume=<run dir>`: rebuild the run's config from its own command-line overrides.

`python -m flair_fl.run resume=outputs/runs/X` continues X with X's settings: the overrides
Hydra saved in X/.hydra/overrides.yaml are composed again, with any override given now on top
(harmless ones such as `simulation=gpu`; one that changes results is refused by the
experiment with the differing keys listed). The saved overrides are a file on disk: only
overrides of the config's own keys and groups are accepted from it
(flair_fl.artifacts.resume_overrides).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig

from flair_fl.artifacts.resume_overrides import merge_resume_overrides
from flair_fl.errors import ConfigError


def _saved_overrides(path: Path) -> list[str]:
    """The list of strings Hydra wrote (safe YAML: plain data only)."""
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None
    if saved is None:
        return []
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        raise ConfigError(f"{path}: expected a list of override strings, as Hydra writes")
    return saved


def _group_options(group: str) -> list[str]:
    return list(GlobalHydra.instance().config_loader().get_group_options(group))


def _compose(overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name="config", overrides=overrides)
    except HydraException as err:  # e.g. a saved value of the wrong type
        raise ConfigError(f"resume: the run's overrides do not compose ({err})") from None


def resume_config(cfg: DictConfig) -> DictConfig:
    """The composed config of the run being resumed (current overrides win)."""
    saved = Path(str(cfg.resume)) / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return cfg  # not a Hydra run dir: the experiment compares configs key by key
    current = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    merged = merge_resume_overrides(
        _saved_overrides(saved), current, str(saved), _group_options, _compose
    )
    return _compose(merged)
