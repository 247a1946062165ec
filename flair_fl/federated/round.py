"""The federated round loop: `run_rounds`, the one place a round happens, step by step.

Each round: (1) the sampler draws `cohort_size` FLAIR users (seeded) and the loop maps
them onto the supernodes (concurrency slots, not users); (2) the server strategy says
what to send (federated/contract.py) and the transport publishes the global weights once;
(3) every user's message goes out and each reply is folded into the round's sum as it
arrives, through privacy's per-update hook (float64 sums, so arrival order does not show;
exchange.py, aggregate.py); (4) privacy's on-sum hook turns the sum into the round's mean;
(5) the strategy's server step makes the new global weights from it; (6) the after-round
callback (evaluation, loggers, checkpoints; modes/) gets the round's metrics and may stop.

Faults: a client that raises, hangs past `simulation.client_timeout` or whose actor dies
comes back as an error reply (the actor pool replaces dead actors, simulation.py); replies
missing at `round_timeout` count as timed out; a non-finite update is rejected. The round
goes on with what remains; with fewer than `min_replies` usable updates the model stays
unchanged (the round is skipped and logged). If every update of a round is non-finite the
run has diverged and stops (outcome.diverged) without touching the last good model.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType
from flwr.serverapp import Grid

from flair_fl.federated.aggregate import MeanReduction, MetricsReduction
from flair_fl.federated.contract import ServerStrategy
from flair_fl.federated.exchange import (
    FAILURE_KINDS,
    RoundFold,
    cohort_messages,
    exchange,
    wait_for_nodes,
)
from flair_fl.federated.sampling import Sampler
from flair_fl.federated.transport import MessageTransport
from flair_fl.privacy.stages import RoundPrivacy
from flair_fl.protocol import SERVER_ROUND_KEY, SPLIT_KEY
from flair_fl.services import stopping
from flair_fl.services.memory import peak_rss_mb

log = logging.getLogger(__name__)
# After each round: (round, global arrays, the round's metrics) -> True to stop the run.
AfterRound = Callable[[int, ArrayRecord, dict[str, Any]], bool | None]
# After a federated evaluation: (round, the replies) -> metrics to log with the round.
OnFedEval = Callable[[int, list[Message]], dict[str, Any]]


def is_measurement(key: str) -> bool:
    """Whether a metric measures the machine (times, memory), not the learning: those
    differ between otherwise identical runs."""
    return key.startswith("time_") or key.endswith(("_s", "_mb"))


@dataclass
class RoundPlan:
    """What the loop runs."""

    num_rounds: int
    sampler: Sampler
    round_timeout: float = 3600.0
    base_config: dict[str, Any] = field(default_factory=dict)
    fed_eval_sampler: Sampler | None = None  # federated evaluation on val users
    fed_eval_every: int = 0
    num_supernodes: int = 1
    # Asked before each round; a returned reason (e.g. privacy budget spent) ends the run.
    should_stop: Callable[[int], str | None] | None = None
    # Called before each round, e.g. to set the server learning rate; a number it returns
    # is logged as the round's `server_lr`.
    before_round: Callable[[int], float | None] | None = None
    transport: MessageTransport = field(default_factory=MessageTransport)
    min_replies: int = 1  # fewer usable updates: the round is skipped (model unchanged)
    poll_interval: float = 0.005  # seconds between polls for replies
    # The fault client.faults injects into (round, user), if any: such failures are reported
    # as injected, not blamed on the learning rate or the machine.
    fault_of: Callable[[int, str], str | None] | None = None


@dataclass
class LoopOutcome:
    """Filled in by the ServerApp thread; read by the caller after the simulation."""

    arrays: ArrayRecord | None = None
    rounds_done: int = 0
    stop_reason: str | None = None
    error: BaseException | None = None
    diverged: bool = False
    rounds_run: int = 0  # by this process (a resumed run counts from its resumption)
    rounds_skipped: int = 0
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_KINDS, 0))


def run_rounds(
    grid: Grid,
    strategy: ServerStrategy,
    privacy: RoundPrivacy,
    arrays: ArrayRecord,
    plan: RoundPlan,
    after_round: AfterRound,
    on_fed_eval: OnFedEval | None,
    outcome: LoopOutcome,
    start_round: int = 1,
) -> None:
    """Run rounds `start_round..num_rounds`; `after_round` returning True stops early."""
    node_ids = wait_for_nodes(grid, plan.num_supernodes, plan.round_timeout)
    for server_round in range(start_round, plan.num_rounds + 1):
        if _stop_before(server_round, plan, outcome):
            break
        clock = {"started": time.perf_counter()}
        # 1. sample the round's users (and set the round's server lr)
        server_lr = plan.before_round(server_round) if plan.before_round else None
        users = plan.sampler.sample(server_round)
        clock["sampled"] = time.perf_counter()
        # 2. payload: what the strategy sends (FedProx's mu, SCAFFOLD's control variate)
        payload, config = strategy.payload(server_round, arrays, dict(plan.base_config))
        privacy.begin_round(server_round, arrays, payload)
        # 3. send, and fold each reply in as it arrives (privacy's per-update hook first)
        fold = _round_fold(server_round, users, strategy.weight_key, privacy, plan)
        messages = _train_messages(server_round, payload, config, users, node_ids, plan)
        clock["sent"] = time.perf_counter()
        exchange(grid, messages, plan.round_timeout, plan.poll_interval, fold)
        if stop := stopping.requested():  # abandon the round: the model stays the last round's
            plan.transport.end_round()
            log.warning("round %d abandoned: %s", server_round, stop.name)
            break
        clock["received"] = time.perf_counter()
        if _usable(server_round, fold, plan, outcome):
            # 4. privatise: privacy's on-sum hook makes the round's mean of the sum
            mean = privacy.on_sum(server_round, fold.reduction)
            # 5. server step: the strategy's new global weights from that mean
            new = (
                None
                if mean is None
                else strategy.server_step(server_round, mean, fold.reduction.count)
            )
            arrays = arrays if new is None else new
            privacy.after_round(server_round, fold.accepted)
        clock["aggregated"] = time.perf_counter()
        plan.transport.end_round()
        # 6. after-round callbacks: metrics (with federated evaluation), loggers, stop
        metrics = _round_metrics(fold, plan, server_lr, clock)
        if on_fed_eval and _fed_eval_due(server_round, plan):
            metrics.update(_federated_eval(grid, arrays, plan, server_round, node_ids, on_fed_eval))
        metrics["round_time_s"] = time.perf_counter() - clock["started"]
        outcome.arrays, outcome.rounds_done = arrays, server_round
        if after_round(server_round, arrays, metrics) or outcome.diverged:
            if outcome.diverged:
                log.error("%s", outcome.stop_reason)
            break


def _stop_before(server_round: int, plan: RoundPlan, outcome: LoopOutcome) -> bool:
    """Whether the run stops before this round: a stop request or `plan.should_stop`."""
    if stop := stopping.requested():
        log.warning("stopping before round %d: %s", server_round, stop.name)
        return True
    if plan.should_stop and (reason := plan.should_stop(server_round)):
        outcome.stop_reason = reason
        log.warning("stopping before round %d: %s", server_round, reason)
        return True
    return False


def _round_fold(
    server_round: int, users: list[str], weight_key: str, privacy: RoundPrivacy, plan: RoundPlan
) -> RoundFold:
    fold = RoundFold(
        plan.transport,
        MeanReduction(weight_key),
        MetricsReduction(weight_key),
        per_update=privacy.per_update,
        round_label=f"round {server_round}",
    )
    if plan.fault_of is not None:
        fold.fault_of = functools.partial(_injected, plan.fault_of, server_round, users)
    return fold


def _injected(
    fault_of: Callable[[int, str], str | None], server_round: int, users: list[str], index: int
) -> str | None:
    return fault_of(server_round, users[index])


def _train_messages(
    server_round: int,
    payload: ArrayRecord,
    config: dict[str, Any],
    users: list[str],
    node_ids: list[int],
    plan: RoundPlan,
) -> list[Message]:
    """The round's train messages: the payload published once, one message per user."""
    entries, inline = plan.transport.publish("train", payload)
    config = {**config, SERVER_ROUND_KEY: server_round, **entries}
    return cohort_messages(inline, config, users, node_ids, MessageType.TRAIN)


def _usable(server_round: int, fold: RoundFold, plan: RoundPlan, outcome: LoopOutcome) -> bool:
    """Book the round's failures; whether enough updates came for a server step."""
    ok, rejected = fold.reduction.count, fold.failures["rejected"]
    skipped = ok < plan.min_replies
    outcome.rounds_run += 1
    outcome.rounds_skipped += skipped
    for kind, count in fold.failures.items():
        outcome.failures[kind] += count
    if ok == 0 and rejected > 0:
        outcome.diverged = True
        cause = (
            "all injected by client.faults (kind nan), not a learning problem"
            if fold.injected >= rejected
            else "lower client.lr?"
        )
        outcome.stop_reason = (
            f"training diverged in round {server_round}: all {rejected} client updates "
            f"were NaN/inf; the model of the last good round is kept ({cause})"
        )
    elif skipped:
        log.warning(
            "round %d skipped: %d usable updates < min_replies=%d (failures: %s)",
            server_round,
            ok,
            plan.min_replies,
            fold.failures,
        )
    return not outcome.diverged and not skipped and ok > 0


def _round_metrics(
    fold: RoundFold, plan: RoundPlan, server_lr: float | None, clock: dict[str, float]
) -> dict[str, Any]:
    summary, ok = fold.metrics.result(), fold.reduction.count
    return {
        "train_loss": summary.get("train-loss", float("nan")),
        "train_steps": summary.get("num-steps", float("nan")),
        "train_images": summary.get("num-examples", 0.0),
        "clients_ok": ok,
        "clients_failed": plan.sampler.cohort_size - ok,
        **{f"clients_{kind}": n for kind, n in fold.failures.items()},
        "round_skipped": int(ok < plan.min_replies),
        **({} if server_lr is None else {"server_lr": server_lr}),
        "time_sample_s": clock["sampled"] - clock["started"],
        "time_send_s": clock["sent"] - clock["sampled"],
        "time_wait_s": clock["received"] - clock["sent"] - fold.busy_s,
        "time_aggregate_s": fold.busy_s + clock["aggregated"] - clock["received"],
        "client_load_s": summary.get("time-load", 0.0),
        "client_compute_s": summary.get("time-compute", 0.0),
        "client_reply_s": summary.get("time-reply", 0.0),
        "client_rss_mb": summary.get("peak-rss-mb", float("nan")),
        "client_gpu_mem_mb": summary.get("gpu-mem-mb", float("nan")),
        "driver_rss_mb": peak_rss_mb(),
    }


def _fed_eval_due(server_round: int, plan: RoundPlan) -> bool:
    return bool(
        not stopping.requested()  # the round is kept; its federated evaluation is not
        and plan.fed_eval_sampler
        and plan.fed_eval_every
        and server_round % plan.fed_eval_every == 0
    )


def _federated_eval(
    grid: Grid,
    arrays: ArrayRecord,
    plan: RoundPlan,
    server_round: int,
    node_ids: list[int],
    on_fed_eval: OnFedEval,
) -> dict[str, Any]:
    assert plan.fed_eval_sampler is not None
    eval_users = plan.fed_eval_sampler.sample(server_round, purpose="federated-eval")
    entries, inline = plan.transport.publish("eval", arrays)
    eval_msgs = cohort_messages(
        inline,
        {SERVER_ROUND_KEY: server_round, SPLIT_KEY: "val", **entries},
        eval_users,
        node_ids,
        MessageType.EVALUATE,
    )
    replies: list[Message] = []

    def keep(index: int, reply: Message | None) -> None:
        if reply is not None and not reply.has_error():
            replies.append(reply)

    try:
        exchange(grid, eval_msgs, plan.round_timeout, plan.poll_interval, keep)
    finally:
        plan.transport.end_round()
    return on_fed_eval(server_round, replies)
