"""The wire protocol between the ServerApp and the ClientApp: what a message carries.

Both apps, the transports and privacy import these names from here, and only from here, so
the protocol is read in one place and nothing imports a handler to learn a key.

A train message holds a ConfigRecord under `CONFIG_KEY` (the entries below) and, with the
message transport, the global weights as an ArrayRecord under `ARRAYS_KEY`; with the shared
transport the config names a weights file and its `Layout` instead. A reply holds the update
(`ARRAYS_KEY`, or a file named in its meta record), its metrics under `METRICS_KEY` (with
both aggregation weights) and the user it trained under `META_KEY`.

A client that fails comes back as an error reply; its Flower `Error.code` says why
(`failure_kind`), set where the error is made (the actor pool, flower_patch.py, or Flower).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

from flair_fl.learning.metrics import MetricState

# Records of a message's RecordDict.
ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, META_KEY = "arrays", "config", "metrics", "meta"

# Aggregation weights every reply's metrics carry (strategy `weighted_by_key`).
UNIFORM_WEIGHT_KEY = "uniform-weight"  # always 1: per-user (unweighted) averaging
EXAMPLES_WEIGHT_KEY = "num-examples"

# Config entries of train and evaluate messages (USER_ID_KEY, COHORT_INDEX_KEY also in replies'
# meta records).
USER_ID_KEY = "user-id"
COHORT_INDEX_KEY = "cohort-index"  # the user's place in the round's cohort
SERVER_ROUND_KEY = "server-round"
USER_REPEAT_KEY = "user-repeat"  # > 0: the user was drawn again this round (with replacement)
SPLIT_KEY = "split"  # evaluate: the split to evaluate on
PROXIMAL_MU_KEY = "proximal-mu"  # FedProx's mu, set by the strategy (Flower's entry name)

# Shared transport (transport.py): config entries of a message and meta entries of a reply.
WEIGHTS_PATH_KEY, LAYOUT_KEY, REPLY_DIR_KEY = "weights-path", "weights-layout", "reply-dir"
REPLY_PATH_KEY = "update-path"

# Train reply metrics the server reads by name.
TRAIN_LOSS_KEY, NUM_STEPS_KEY = "train-loss", "num-steps"

# Error codes of failed clients' replies, above Flower's own (flwr.common.constant.ErrorCode,
# 0-8; a ClientApp that raised gets its CLIENT_APP_RAISED_EXCEPTION).
CLIENT_TIMEOUT = 100  # ran past simulation.client_timeout; its actor was killed and replaced
CLIENT_ACTOR_DIED = 101  # its actor process died (killed, out of memory); it was replaced
CLIENT_STOPPED = 102  # the run is stopping: its actor was killed, its reply not waited for
_KIND_OF_CODE = {CLIENT_TIMEOUT: "timeout", CLIENT_ACTOR_DIED: "died"}


def failure_kind(error_code: int) -> str:
    """How a client failed, from its error reply's code: "timeout", "died" or "raised".

    Every other code is "raised": Flower's (the ClientApp raised, could not load, crashed)
    and CLIENT_STOPPED, whose round is abandoned uncounted."""
    return _KIND_OF_CODE.get(int(error_code), "raised")


@dataclass(frozen=True)
class Layout:
    """Names and shapes of float32 arrays laid end to end in one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(shape)) for shape in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @classmethod
    def of(cls, arrays: Mapping[str, Any]) -> Layout:
        """Layout of named arrays (numpy arrays, tensors or Flower Arrays)."""
        return cls(tuple(arrays), tuple(tuple(int(d) for d in a.shape) for a in arrays.values()))

    def to_json(self) -> str:
        return json.dumps([self.names, self.shapes])

    @classmethod
    def from_json(cls, text: str) -> Layout:
        names, shapes = json.loads(text)
        return cls(tuple(names), tuple(tuple(s) for s in shapes))

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The named arrays as views into `flat` (no copy)."""
        if flat.size != self.size:
            raise ValueError(f"flat vector has {flat.size} values, layout needs {self.size}")
        out, start = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            out[name] = flat[start : start + size].reshape(shape)
            start += size
        return out

    def to_record(self, flat: np.ndarray) -> ArrayRecord:
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in self.views(flat).items()})


def flatten_record(record: ArrayRecord) -> tuple[Layout, np.ndarray]:
    """One float32 vector holding a record's arrays (the message transport's decode)."""
    layout = Layout.of(record)
    flat = np.empty(layout.size, dtype=np.float32)
    start = 0
    for array, size in zip(record.values(), layout.sizes, strict=True):
        flat[start : start + size] = array.numpy().ravel()
        start += size
    return layout, flat


def metric_state_to_record(state: MetricState) -> MetricRecord:
    """Flatten summable metric statistics into a MetricRecord (int lists)."""
    return MetricRecord(
        {
            "tp": state.tp.ravel().tolist(),
            "fp": state.fp.ravel().tolist(),
            "fn": state.fn.ravel().tolist(),
            "tp-half": state.tp_half.tolist(),
            "fp-half": state.fp_half.tolist(),
            "fn-half": state.fn_half.tolist(),
            "loss-sum": state.loss_sum,
            "num-images": state.num_images,
            EXAMPLES_WEIGHT_KEY: state.num_images,
            UNIFORM_WEIGHT_KEY: 1,
        }
    )


def metric_state_from_record(record: MetricRecord, num_labels: int) -> MetricState:
    """Inverse of `metric_state_to_record`."""

    def grid(key: str) -> np.ndarray:
        return np.asarray(record[key], dtype=np.int64).reshape(-1, num_labels)

    def row(key: str) -> np.ndarray:
        return np.asarray(record[key], dtype=np.int64)

    return MetricState(
        grid("tp"),
        grid("fp"),
        grid("fn"),
        row("tp-half"),
        row("fp-half"),
        row("fn-half"),
        float(np.asarray(record["loss-sum"])),
        int(np.asarray(record["num-images"])),
    )
