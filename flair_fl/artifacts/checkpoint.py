"""Checkpoints and exact resume.

A checkpoint holds everything a run needs to continue as if never stopped: the global
weights, the server strategy's `state_dict()` (federated/contract.py: optimizer moments,
momentum, SCAFFOLD's control variate), the privacy mechanism's state (clip norm,
accountant progress), the best-val bookkeeping and the config. Client-side RNGs need no
saving: every draw derives from (seed, round, user). Files are written to a temporary name
and renamed, so a kill during a write leaves the previous checkpoint intact.

A checkpoint is data, never code: it holds tensors and plain values only
(flair_fl.artifacts.safe_load) and is loaded with `torch.load(weights_only=True)`, so a
planted pickle cannot run on resume.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from flair_fl.artifacts.durable import write_atomically
from flair_fl.artifacts.safe_load import from_plain, load_plain, to_plain
from flair_fl.errors import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"
# Keys that may differ between a run and its resumption (they do not change results).
NEUTRAL_KEYS = (
    "resume",
    "checkpoint_every",
    "device",
    "simulation",
    "logger",
    "hydra",
    "data.cache_dir",
    "privacy.factorization_cache",  # where dp_bmf caches its strategy matrix
    "eval.batch_size",
    "eval.data_on",
    "eval.overlap",
    "sweep_continue_on_error",
)
# What every checkpoint holds, and the type of each (checked on load, before use).
CHECKPOINT_KEYS = {
    "round": int,
    "arrays": dict,
    "strategy": dict,
    "privacy": dict,
    "tracker": dict,
    "initial_val": dict,
    "config": dict,
}


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` over `path`, whole or not at all (the previous file survives a full
    disk or a kill). Serialised in memory first: torch's own writer reports a full disk as an
    opaque RuntimeError, a plain file write as an OSError that names the file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getvalue())


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Save a checkpoint (tensors and plain values; numpy and ArrayRecords tagged)."""
    atomic_save(to_plain(state, "checkpoint"), path)


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The last checkpoint of a run directory, with a clear error if there is none."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(
            f"resume={run_dir}: no {CHECKPOINT_NAME} there (a run writes one every "
            "`checkpoint_every` rounds and at the end)"
        )
    checkpoint = load_plain(path, f"resume={run_dir}: checkpoint")
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"resume={run_dir}: {path} is not a flair-fl checkpoint")
    for key, kind in CHECKPOINT_KEYS.items():
        if not isinstance(checkpoint.get(key), kind) or isinstance(checkpoint.get(key), bool):
            raise ConfigError(
                f"resume={run_dir}: {path} is not a flair-fl checkpoint ('{key}' is missing "
                f"or not a {kind.__name__})"
            )
    state: dict[str, Any] = from_plain(checkpoint)
    return state


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


# `_target_`s that moved to another module: a checkpoint written before the move names the
# old one, which is the same class or function (a resume compares them as equal).
MOVED_TARGETS = {
    "flair_fl.experiment.run_experiment": "flair_fl.modes.federated.run_experiment",
    "flair_fl.central.run_central": "flair_fl.modes.centralized.run_central",
    "flair_fl.federated.strategies.ServerOptimizer": "flair_fl.algorithms.fedopt.ServerOptimizer",
    "flair_fl.federated.strategies.AdaFedProx": "flair_fl.algorithms.fedprox.AdaFedProx",
    "flair_fl.federated.strategies.Scaffold": "flair_fl.algorithms.scaffold.Scaffold",
}


def _current_target(key: str, value: Any) -> Any:
    if key.endswith("_target_") and isinstance(value, str):
        return MOVED_TARGETS.get(value, value)
    return value


def differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two resolved configs, neutral keys excluded."""
    a = {k: _current_target(k, v) for k, v in _flatten(saved).items()}
    b = _flatten(current)
    neutral = tuple(NEUTRAL_KEYS)
    return sorted(
        k
        for k in set(a) | set(b)
        if a.get(k) != b.get(k) and not any(k == n or k.startswith(n + ".") for n in neutral)
    )
