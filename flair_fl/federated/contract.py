"""The server strategy contract: what the round loop asks of a server strategy.

The loop folds every client update into the round's (weighted) mean as it arrives
(federated/aggregate.py) and hands the strategy that mean, never the replies. So a server
strategy is three things: the payload of a round (what to send besides the global
weights: FedProx's mu, SCAFFOLD's control variate), a server step on the round's mean
(FedAvg: the mean itself; FedAdam: an optimizer step on global - mean), and its state
for checkpoints. `server_lr` is the learning rate of that step (None: it has none), which
the server-lr schedule sets before each round.

flair-fl's own strategies (flair_fl.algorithms) implement `ServerStrategy` directly.
Flower's enter through `FlowerStrategy`, the one place that knows Flower's attribute names;
`server_strategy` checks at build time that a Flower strategy aggregates a mean, and
refuses the others (FedMedian, FedTrimmedAvg, Krum, ...) in one line, rather than
silently turning them into FedAvg.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from flair_fl.errors import ConfigError

REPLIES_KEY = "replies"  # in the merged reply's metrics: how many replies it stands for


@runtime_checkable
class ServerStrategy(Protocol):
    """What the round loop needs from a server strategy (module doc)."""

    weight_key: str  # the reply metric that weights the mean ("uniform-weight", "num-examples")
    server_lr: float | None  # the server step's learning rate; None: it has none

    def payload(
        self, server_round: int, arrays: ArrayRecord, config: dict[str, Any]
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """What round `server_round` sends to every client: arrays and config entries."""
        ...

    def server_step(self, server_round: int, mean: ArrayRecord, replies: int) -> ArrayRecord | None:
        """The new global weights from the round's mean of `replies` updates (None: keep)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Mutable state for checkpoints (tensors, numpy arrays and plain values)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` on resume."""
        ...


# Flower strategies whose aggregate_train is a (weighted) mean followed by a server step on
# it; a subclass that overrides aggregate_train (FedMedian, Krum, ...) is not one of them.
_MEAN_AGGREGATIONS = {
    cls.aggregate_train for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}
# Flower's attribute names: server step state (FedOpt's moments and the weights it keeps,
# FedAvgM's momentum) and the server learning rate.
_FLOWER_STATE = ("m_t", "v_t", "momentum_vector", "current_arrays")


def server_strategy(strategy: object) -> ServerStrategy:
    """`strategy` as the loop's contract: Flower's through the adapter, ours as they are."""
    if isinstance(strategy, Strategy):
        if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train not in (
            _MEAN_AGGREGATIONS
        ):
            raise ConfigError(
                f"strategy.server: {type(strategy).__name__} does not aggregate a mean of the "
                "replies; flair-fl's round folds every update into one (use fedavg, fedprox, "
                "fedavgm, fedadam, fedyogi, fedadagrad, adafedprox or scaffold)"
            )
        return FlowerStrategy(strategy)
    if not isinstance(strategy, ServerStrategy):
        raise ConfigError(
            f"strategy.server: {type(strategy).__name__} is neither a Flower strategy nor a "
            "flair_fl.federated.contract.ServerStrategy"
        )
    return strategy


def strategy_name(strategy: ServerStrategy) -> str:
    """The class name of the strategy (of the Flower strategy behind an adapter)."""
    inner = strategy.strategy if isinstance(strategy, FlowerStrategy) else strategy
    return type(inner).__name__


class _PayloadGrid:
    """The Grid a Flower strategy's configure_train samples from, for its payload only:
    the loop maps users onto supernodes itself, so any node will do."""

    def __init__(self, num_nodes: int):
        self.num_nodes = num_nodes

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.num_nodes + 1))


class FlowerStrategy:
    """A mean-aggregating Flower strategy (FedAvg and its server optimizers) as a
    `ServerStrategy`: its configure_train gives the payload (and keeps its own state right:
    FedOpt remembers the weights sent), its aggregate_train gets the round's mean as one
    reply standing for all of them."""

    def __init__(self, strategy: FedAvg):
        self.strategy = strategy
        self.weight_key = str(strategy.weighted_by_key)
        self._instruction: Message | None = None

    def __repr__(self) -> str:
        return f"FlowerStrategy({type(self.strategy).__name__})"

    @property
    def _lr_attribute(self) -> str | None:
        if isinstance(self.strategy, FedOpt):
            return "eta"
        if isinstance(self.strategy, FedAvgM):
            return "server_learning_rate"
        return None

    @property
    def server_lr(self) -> float | None:
        name = self._lr_attribute
        return None if name is None else float(getattr(self.strategy, name))

    @server_lr.setter
    def server_lr(self, value: float | None) -> None:
        name = self._lr_attribute
        if name is None or value is None:
            return
        setattr(self.strategy, name, value)
        if isinstance(self.strategy, FedAvgM):
            self.strategy.server_opt = True  # FedAvgM skips its update when lr == 1, mu == 0

    def payload(
        self, server_round: int, arrays: ArrayRecord, config: dict[str, Any]
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        strategy = self.strategy
        grid: Any = _PayloadGrid(max(1, strategy.min_available_nodes, strategy.min_train_nodes))
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(config), grid))
        if not messages:  # fraction_train=0: Flower would skip training; we send the weights
            return arrays, config
        self._instruction = messages[0]
        content = messages[0].content
        return next(iter(content.array_records.values())), dict(
            next(iter(content.config_records.values()))
        )

    def server_step(self, server_round: int, mean: ArrayRecord, replies: int) -> ArrayRecord | None:
        metrics = MetricRecord({self.weight_key: 1.0, REPLIES_KEY: replies})
        content = RecordDict({"arrays": mean, "metrics": metrics})
        instruction = self._instruction or Message(
            RecordDict(), message_type=MessageType.TRAIN, dst_node_id=1
        )
        arrays, _ = self.strategy.aggregate_train(
            server_round, [Message(content, reply_to=instruction)]
        )
        return arrays

    def state_dict(self) -> dict[str, Any]:
        return {
            name: value
            for name in _FLOWER_STATE
            if (value := getattr(self.strategy, name, None)) is not None
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in _FLOWER_STATE:
            if name in state:
                setattr(self.strategy, name, state[name])
