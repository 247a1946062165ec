"""Validate a composed run config; every message names the offending key."""

from __future__ import annotations

from typing import Any, cast

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type."""


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _require(
    cfg: DictConfig,
    key: str,
    kind: type | tuple[type, ...],
    low: float | None = None,
    high: float | None = None,
    allow_none: bool = False,
    low_inclusive: bool = True,
) -> None:
    value = _get(cfg, key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConfigError(f"{key}={value!r}: expected {names}")
    number = float(cast(float, value))
    too_low = low is not None and (number < low if low_inclusive else number <= low)
    if too_low or (high is not None and number > high):
        lo = "-inf" if low is None else f"{low}"
        bracket = "[" if low_inclusive else "("
        raise ConfigError(
            f"{key}={value!r}: must be in {bracket}{lo}, {'inf' if high is None else high}]"
        )


def validate_run_config(cfg: DictConfig, num_train_users: int | None = None) -> None:
    """Check the run-level keys; with the population size, also the cohort."""
    number = (int, float)
    _require(cfg, "seed", int, 0)
    _require(cfg, "num_rounds", int, 1)
    _require(cfg, "cohort_size", int, 1, num_train_users)
    _require(cfg, "eval_every", int, 0)
    _require(cfg, "checkpoint_every", int, 0)
    _require(cfg, "client.epochs", int, 1)
    _require(cfg, "client.batch_size", int, 1)
    _require(cfg, "client.lr", number, 0, low_inclusive=False)
    _require(cfg, "client.momentum", number, 0, 1)
    _require(cfg, "client.grad_clip", number, 0, allow_none=True, low_inclusive=False)
    _require(cfg, "client.max_images", int, 1, allow_none=True)
    _require(cfg, "eval.batch_size", int, 1)
    _require(cfg, "eval.federated_cohort", int, 0)
    _require(cfg, "simulation.num_supernodes", int, 1)
    _require(cfg, "simulation.round_timeout", number, 0, low_inclusive=False)
    if "client_timeout" in cfg.simulation:
        _require(cfg, "simulation.client_timeout", number, 0, allow_none=True, low_inclusive=False)
    if "actor_start_timeout" in cfg.simulation:
        _require(cfg, "simulation.actor_start_timeout", number, 0)
    _require(cfg, "min_replies", int, 1, cfg.cohort_size)
    _require(cfg, "server_lr_schedule.warmup_rounds", int, 0)
    _require(cfg, "server_lr_schedule.final_factor", number, 0, 1)
    if "lr_end" in cfg.server_lr_schedule:  # polynomial_decay_with_warmup
        _require(cfg, "server_lr_schedule.lr_end", number, 0)
        _require(cfg, "server_lr_schedule.training_steps", int, 1, allow_none=True)
        _require(cfg, "server_lr_schedule.power", number, 0, low_inclusive=False)
    if cfg.client.get("precision", "fp32") not in ("fp32", "bf16"):
        raise ConfigError(f"client.precision={cfg.client.precision!r}: expected fp32 or bf16")
    if "faults" in cfg.client:
        _require(cfg, "client.faults.probability", number, 0, 1)
        _require(cfg, "client.faults.hang_s", number, 0, low_inclusive=False)
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r}: expected one of auto, cpu, cuda")
