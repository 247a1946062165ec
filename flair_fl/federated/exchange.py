"""Sending a cohort its messages, collecting the replies, and folding them into the round.

`exchange` pushes the messages and handles each reply as it arrives (then every message
still unanswered at the round timeout); `RoundFold` is the handler of a train round: it
classifies failures, rejects unusable updates and folds the rest, through the privacy
stage's per-update hook, into the round's running sum (federated/aggregate.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from flair_fl.federated.aggregate import MeanReduction, MetricsReduction
from flair_fl.federated.sampling import repeat_indices
from flair_fl.federated.transport import MessageTransport
from flair_fl.protocol import (
    ARRAYS_KEY,
    COHORT_INDEX_KEY,
    CONFIG_KEY,
    META_KEY,
    METRICS_KEY,
    TRAIN_LOSS_KEY,
    USER_ID_KEY,
    USER_REPEAT_KEY,
    Layout,
    failure_kind,
)
from flair_fl.services import stopping

log = logging.getLogger(__name__)
# A failed client's whole error (its traceback): <run dir>/clients.log (conf/config.yaml)
client_log = logging.getLogger("flair_fl.clients")
FAILURE_KINDS = ("raised", "timeout", "died", "rejected")
PerUpdate = Callable[[Layout, np.ndarray], "np.ndarray | str"]


def cohort_messages(
    arrays: ArrayRecord | None,
    config: dict[str, Any],
    users: list[str],
    node_ids: list[int],
    message_type: str,
) -> list[Message]:
    """One message per sampled user, spread over the supernodes in turn."""
    messages = []
    for index, (user, repeat) in enumerate(zip(users, repeat_indices(users), strict=True)):
        entry = {**config, USER_ID_KEY: user, COHORT_INDEX_KEY: index}
        if repeat:  # a sampler with replacement drew this user again
            entry[USER_REPEAT_KEY] = repeat
        content = RecordDict({CONFIG_KEY: ConfigRecord(entry)})
        if arrays is not None:
            content[ARRAYS_KEY] = arrays
        messages.append(
            Message(
                content=content,
                message_type=message_type,
                dst_node_id=node_ids[index % len(node_ids)],
            )
        )
    return messages


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Supernodes register while the ServerApp starts; wait until all are there."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} supernodes registered")
        time.sleep(0.05)
    return node_ids


def last_line(text: str, limit: int = 200) -> str:
    """The last non-empty line of `text` (a traceback's exception line), cut to `limit`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else text.strip()
    return line if len(line) <= limit else f"{line[: limit - 3]}..."


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    poll_interval: float,
    handle: Callable[[int, Message | None], None],
) -> None:
    """Send `messages`; call `handle(cohort index, reply)` for each reply as it comes, then
    `handle(index, None)` for each message still unanswered at `timeout`. A stop request
    (stopping.py) ends the wait at once, leaving the rest unhandled.

    Replies are handled on arrival (not held back for cohort order): users' sizes vary
    500-fold, so waiting for order would keep most of a cohort's updates in memory."""
    ids = list(grid.push_messages(messages))
    index_of = {message_id: index for index, message_id in enumerate(ids)}
    pending = set(ids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if stopping.requested():
            return
        replies = list(grid.pull_messages(pending))
        for reply in replies:
            message_id = reply.metadata.reply_to_message_id
            pending.discard(message_id)
            handle(index_of[message_id], reply)
        if not replies:
            time.sleep(poll_interval)
    for message_id in sorted(pending, key=index_of.__getitem__):
        handle(index_of[message_id], None)


def _as_is(layout: Layout, flat: np.ndarray) -> np.ndarray | str:
    return flat


@dataclass
class RoundFold:
    """Folds one round's replies into its reduction and counts what failed, and why.

    Each usable update passes `per_update` (the privacy stage's hook: central DP clips it)
    before it is added to the sum."""

    transport: MessageTransport
    reduction: MeanReduction
    metrics: MetricsReduction
    per_update: PerUpdate = _as_is
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_KINDS, 0))
    accepted: list[Message] = field(default_factory=list)  # without their arrays
    busy_s: float = 0.0
    round_label: str = ""
    fault_of: Callable[[int], str | None] = lambda index: None  # cohort index -> injected
    injected: int = 0  # failures and rejections that client.faults injected

    def __call__(self, index: int, reply: Message | None) -> None:
        started = time.perf_counter()
        try:
            self._fold(index, reply)
        finally:
            if reply is not None and not reply.has_error():
                self.transport.release(reply)
            self.busy_s += time.perf_counter() - started

    def _fold(self, index: int, reply: Message | None) -> None:
        if reply is None:
            self.failures["timeout"] += 1
            self.injected += self.fault_of(index) is not None
        elif reply.has_error():
            self._failed(index, reply)
        elif reason := self._add(reply):
            self._rejected(index, reply, reason)
        else:
            self.metrics.add(reply.content.metric_records[METRICS_KEY])
            if ARRAYS_KEY in reply.content.array_records:  # keep the metadata, free the update
                del reply.content.array_records[ARRAYS_KEY]
            self.accepted.append(reply)

    def _add(self, reply: Message) -> str | None:
        """Fold the reply's update in; why it is rejected, or None."""
        record = reply.content.metric_records[METRICS_KEY]
        if not math.isfinite(float(record.get(TRAIN_LOSS_KEY, 0.0))):  # type: ignore[arg-type]
            return "a non-finite training loss"
        layout, flat = self.transport.reply_vector(reply)
        update = self.per_update(layout, flat)
        if isinstance(update, str):
            return update
        weight = float(record[self.reduction.weight_key])  # type: ignore[arg-type]
        return self.reduction.add(layout, update, weight)

    def _failed(self, index: int, reply: Message) -> None:
        kind = failure_kind(reply.error.code)  # set where the error was made (flower_patch.py)
        self.failures[kind] += 1
        fault = self.fault_of(index)
        self.injected += fault is not None
        why = f"injected fault ({fault}, client.faults)" if fault else str(reply.error.reason)
        client_log.error("%s: client %d failed (%s):\n%s", self.round_label, index, kind, why)
        log.warning(
            "%s: client %d failed (%s): %s (full error: clients.log in the run dir)",
            self.round_label,
            index,
            kind,
            last_line(why),
        )

    def _rejected(self, index: int, reply: Message, reason: str) -> None:
        self.failures["rejected"] += 1
        if self.fault_of(index) is not None:
            self.injected += 1
            reason = f"{reason} (injected fault, client.faults)"
        user = reply.content.config_records[META_KEY].get(USER_ID_KEY)
        log.warning("%s: update of user %s rejected: %s", self.round_label, user, reason)
