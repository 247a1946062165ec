"""Files a run reads back hold tensors and plain values only, and load without unpickling code.

A checkpoint, a model file or a pretrained-weights file comes from disk, where anyone who can
write the run directory (or hand over a file) controls it; a pickle can run any code while it
loads. So every such file is read with `torch.load(weights_only=True)`, which rebuilds only
tensors, dicts, lists, tuples, strings, numbers, booleans and None, and refuses anything else
before it runs. What we save must therefore be made of those alone: `to_plain` turns the few
other things our state holds (numpy arrays and scalars, Flower ArrayRecords) into tensors
under a tag, and `from_plain` turns them back after loading.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from flair_fl.errors import ConfigError

# Tags of values stored as tensors: a one-key dict {tag: payload}.
NUMPY_TAG, RECORD_TAG = "__flair_fl_numpy__", "__flair_fl_array_record__"
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def to_plain(value: Any, where: str = "state") -> Any:
    """`value` made of tensors and plain values only (numpy and ArrayRecords tagged).

    Anything else raises TypeError naming where it is, at save time: a checkpoint that
    could not be loaded back with `weights_only=True` must never be written.
    """
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return value.item()
    if isinstance(value, (torch.Tensor, *_PLAIN_SCALARS)):
        return value
    if isinstance(value, np.ndarray):
        return {NUMPY_TAG: torch.from_numpy(np.array(value, copy=True))}
    if isinstance(value, ArrayRecord):
        return {RECORD_TAG: dict(value.to_torch_state_dict())}
    if isinstance(value, dict):
        return {_plain_key(k, where): to_plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"{where}: a {type(value).__name__} cannot be saved in a checkpoint (tensors and plain "
        "values only, so that it loads with torch.load(weights_only=True))"
    )


def _plain_key(key: Any, where: str) -> Any:
    if isinstance(key, np.generic):
        return key.item()
    if not isinstance(key, _PLAIN_SCALARS):
        raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not a plain value")
    return key


def from_plain(value: Any) -> Any:
    """Undo `to_plain`: tagged tensors back to numpy arrays and ArrayRecords."""
    if isinstance(value, dict):
        if len(value) == 1 and NUMPY_TAG in value:
            return value[NUMPY_TAG].numpy()
        if len(value) == 1 and RECORD_TAG in value:
            return ArrayRecord(value[RECORD_TAG])
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(from_plain(v) for v in value)
    return value


def load_plain(path: str | Path, what: str) -> Any:
    """`torch.load(path, weights_only=True)` with every failure as one ConfigError line.

    `what` names the file's role in the message (e.g. `resume=<dir>: checkpoint`).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise ConfigError(
            f"{what} {path}: refused, it holds Python objects other than tensors and plain "
            f"values, which could run code when loaded ({first.strip()[:200]})"
        ) from None
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else "empty file"
        raise ConfigError(
            f"{what} {path}: cannot be read, it is truncated, damaged or not a torch file "
            f"({type(err).__name__}: {reason})"
        ) from None


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A file that must hold a state dict ({name: tensor}), loaded safely."""
    state = load_plain(path, what)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        kind = type(state).__name__
        raise ConfigError(
            f"{what} {path}: not a state dict (a dict of tensor names to tensors, as "
            f"`torch.save(model.state_dict(), path)` writes); it holds a {kind}"
        )
    return state
