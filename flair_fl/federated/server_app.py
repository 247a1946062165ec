"""The ServerApp: the one federated round loop.

Each round the driver samples `cohort_size` FLAIR users (seeded), maps them onto the
supernodes (concurrency slots, not users), sends each the global weights and its user id,
lets the Flower strategy aggregate the replies (in cohort order, so results do not depend on
arrival order), evaluates centrally every `eval_every` rounds, and reports to the loggers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from flair_fl.federated.client_app import ARRAYS_KEY, CONFIG_KEY, META_KEY
from flair_fl.federated.sampling import CohortSampler

log = logging.getLogger(__name__)
RoundHook = Callable[[int, ArrayRecord, dict[str, Any]], bool | None]


@dataclass
class RoundPlan:
    """What the loop runs."""

    num_rounds: int
    sampler: CohortSampler
    round_timeout: float = 3600.0
    base_config: dict[str, Any] = field(default_factory=dict)
    fed_eval_sampler: CohortSampler | None = None  # federated evaluation on val users
    fed_eval_every: int = 0
    num_supernodes: int = 1
    # Asked before each round; a returned reason (e.g. privacy budget spent) ends the run.
    should_stop: Callable[[int], str | None] | None = None
    before_round: Callable[[int], None] | None = None  # e.g. set the server learning rate


@dataclass
class LoopOutcome:
    """Filled in by the ServerApp thread; read by the caller after the simulation."""

    arrays: ArrayRecord | None = None
    rounds_done: int = 0
    stop_reason: str | None = None
    error: BaseException | None = None


def _cohort_messages(
    arrays: ArrayRecord | None,
    config: dict[str, Any],
    users: list[str],
    node_ids: list[int],
    message_type: str,
) -> list[Message]:
    messages = []
    for index, user in enumerate(users):
        content = RecordDict(
            {CONFIG_KEY: ConfigRecord({**config, "user-id": user, "cohort-index": index})}
        )
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


def _wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Supernodes register while the ServerApp starts; wait until all are there."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} supernodes registered")
        time.sleep(0.05)
    return node_ids


def _in_cohort_order(replies: list[Message]) -> tuple[list[Message], list[Message]]:
    ok = [m for m in replies if not m.has_error()]
    failed = [m for m in replies if m.has_error()]
    ok.sort(key=lambda m: int(str(m.content.config_records[META_KEY]["cohort-index"])))
    return ok, failed


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    plan: RoundPlan,
    on_round: RoundHook,
    on_fed_eval: Callable[[int, list[Message]], dict[str, Any]] | None,
    outcome: LoopOutcome,
    start_round: int = 1,
) -> None:
    """Run rounds `start_round..num_rounds`; `on_round` returning True stops early."""
    node_ids = _wait_for_nodes(grid, plan.num_supernodes, plan.round_timeout)
    for server_round in range(start_round, plan.num_rounds + 1):
        if plan.should_stop and (reason := plan.should_stop(server_round)):
            outcome.stop_reason = reason
            log.warning("stopping before round %d: %s", server_round, reason)
            break
        started = time.perf_counter()
        if plan.before_round:
            plan.before_round(server_round)
        users = plan.sampler.sample(server_round)
        # The strategy's own configure_train keeps its state right (FedOpt remembers the
        # current weights) and says what to send (FedProx adds proximal-mu, SCAFFOLD adds its
        # control variate to the arrays); we keep that payload and replace its node
        # sampling by our user -> supernode mapping.
        template = list(
            strategy.configure_train(
                server_round, arrays, ConfigRecord(dict(plan.base_config)), grid
            )
        )
        config = dict(template[0].content[CONFIG_KEY]) if template else dict(plan.base_config)
        config["server-round"] = server_round
        payload = template[0].content.array_records[ARRAYS_KEY] if template else arrays
        messages = _cohort_messages(payload, config, users, node_ids, MessageType.TRAIN)
        replies, failed = _in_cohort_order(
            list(grid.send_and_receive(messages, timeout=plan.round_timeout))
        )
        for reply in failed:
            log.warning("round %d: a client failed: %s", server_round, reply.error.reason)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        reported = dict(train_metrics or {})
        metrics: dict[str, Any] = {
            "train_loss": reported.get("train-loss", float("nan")),
            "train_steps": reported.get("num-steps", float("nan")),
        }
        metrics.update(
            {
                "clients_ok": len(replies),
                "clients_failed": len(failed)
                + plan.sampler.cohort_size
                - len(replies)
                - len(failed),
                "round_time_s": time.perf_counter() - started,
            }
        )
        if (
            on_fed_eval
            and plan.fed_eval_sampler
            and plan.fed_eval_every
            and server_round % plan.fed_eval_every == 0
        ):
            eval_users = plan.fed_eval_sampler.sample(server_round, purpose="federated-eval")
            eval_msgs = _cohort_messages(
                arrays,
                {"server-round": server_round, "split": "val"},
                eval_users,
                node_ids,
                MessageType.EVALUATE,
            )
            eval_ok, _ = _in_cohort_order(
                list(grid.send_and_receive(eval_msgs, timeout=plan.round_timeout))
            )
            metrics.update(on_fed_eval(server_round, eval_ok))
        outcome.arrays, outcome.rounds_done = arrays, server_round
        if on_round(server_round, arrays, metrics):
            break


def make_server_app(
    strategy: Strategy,
    initial_arrays: ArrayRecord,
    plan: RoundPlan,
    on_round: RoundHook,
    outcome: LoopOutcome,
    on_fed_eval: Callable[[int, list[Message]], dict[str, Any]] | None = None,
    start_round: int = 1,
) -> ServerApp:
    """A ServerApp running `run_rounds`; results and errors land in `outcome`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_rounds(
                grid, strategy, initial_arrays, plan, on_round, on_fed_eval, outcome, start_round
            )
        except BaseException as err:  # surfaced to the caller after the simulation ends
            outcome.error = err
            raise

    return app
