"""A fake Flower Grid and reply builders, to run the round loop in milliseconds.

Mock, and why: Flower's real Grid needs a SuperLink and supernodes (the simulation engine
on Ray, seconds to start); the loop only pushes messages, pulls replies and asks for node
ids, so `FakeGrid` does those three with a Python function standing for the clients.
The end-to-end tests (test_run, test_faults, ...) run the real engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from flair_fl.federated.aggregate import MeanReduction, MetricsReduction
from flair_fl.federated.contract import ServerStrategy
from flair_fl.federated.exchange import RoundFold
from flair_fl.federated.transport import MessageTransport
from flair_fl.privacy.stages import PlainMean, RoundPrivacy
from tests import flower_messages  # noqa: F401  (sets Flower's task identity for Message())

Weights = dict[str, np.ndarray]
# A client: its train (or evaluate) message -> the reply content, an Error, or None (it
# never answers: the loop's round timeout counts it).
Client = Callable[[Message], RecordDict | Error | None]


class FakeGrid:
    """push_messages / pull_messages / get_node_ids, answering with `client` at once."""

    def __init__(self, client: Client, num_nodes: int = 2):
        self.client, self.num_nodes = client, num_nodes
        self.pushed: list[Message] = []
        self._ids = itertools.count(1)
        self._ready: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.num_nodes + 1))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id  # the real Grid's job
            self.pushed.append(message)
            ids.append(message_id)
            answer = self.client(message)
            if answer is not None:
                self._ready[message_id] = Message(answer, reply_to=message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._ready.pop(i) for i in list(message_ids) if i in self._ready]


def record(weights: Weights) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in weights.items()})


def numpy_of(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in arrays.items()}


def reply_content(
    weights: Weights,
    user: str = "u",
    loss: float = 0.5,
    num_examples: int = 3,
    **arrays: np.ndarray,
) -> RecordDict:
    """A client's train reply as our clients send it (metrics keys, meta with the user)."""
    metrics = MetricRecord(
        {"train-loss": loss, "num-examples": num_examples, "uniform-weight": 1, "num-steps": 2}
    )
    return RecordDict(
        {
            "arrays": record({**weights, **arrays}),
            "metrics": metrics,
            "meta": ConfigRecord({"user-id": user}),
        }
    )


def failed(reason: str = "client crashed") -> Error:
    return Error(code=1, reason=reason)


def run_round(
    strategy: ServerStrategy,
    answers: list[RecordDict | Error],
    base: Weights,
    server_round: int = 1,
    privacy: RoundPrivacy | None = None,
) -> ArrayRecord | None:
    """One round's payload, fold, privatise and server step, as run_rounds does them, on
    hand-made replies (no grid); the new global arrays (None: unchanged)."""
    privacy = privacy or PlainMean()
    arrays = record(base)
    payload, _ = strategy.payload(server_round, arrays, {})
    privacy.begin_round(server_round, arrays, payload)
    key = strategy.weight_key
    fold = RoundFold(
        MessageTransport(), MeanReduction(key), MetricsReduction(key), privacy.per_update
    )
    instruction = Message(RecordDict(), message_type="train", dst_node_id=1)
    for index, answer in enumerate(answers):
        if isinstance(answer, RecordDict):  # the fold frees the update: keep the caller's
            answer = RecordDict(dict(answer.items()))
        fold(index, Message(answer, reply_to=instruction))
    mean = privacy.on_sum(server_round, fold.reduction)
    new = None if mean is None else strategy.server_step(server_round, mean, fold.reduction.count)
    privacy.after_round(server_round, fold.accepted)
    return new
