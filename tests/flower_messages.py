"""Build Flower reply Messages by hand, for strategy unit tests.

Inside a running ServerApp, Flower sets the task identity that Message() reads; these unit
tests call strategies directly, so they set it themselves.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

# Flower's ServerApp sets these for the process; strategy unit tests run outside one.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def reply(values: dict[str, np.ndarray], num_examples: int = 1) -> Message:
    """A client's train reply: weights plus the metric keys our clients send."""
    instruction = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=1)
    metrics = MetricRecord({"num-examples": num_examples, "uniform-weight": 1, "train-loss": 0.0})
    return Message(
        content=RecordDict({"arrays": arrays(values), "metrics": metrics}), reply_to=instruction
    )
