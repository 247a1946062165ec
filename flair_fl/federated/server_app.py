"""The ServerApp: the one federated round loop.

Each round the driver samples `cohort_size` FLAIR users (seeded), maps them onto the
supernodes (concurrency slots, not users), publishes the global weights once (transport.py)
and sends each user's message, folds the replies into the round's reduction as they arrive
(float64 sums, so arrival order does not show, reduce.py), lets the Flower strategy apply
its server step to the reduced round, evaluates centrally every `eval_every` rounds, and
reports to the loggers.

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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from flair_fl.federated.protocol import ARRAYS_KEY, CONFIG_KEY, META_KEY, METRICS_KEY
from flair_fl.federated.reduce import MeanReduction, MetricsReduction, Reduction
from flair_fl.federated.sampling import Sampler, repeat_indices
from flair_fl.federated.transport import MessageTransport
from flair_fl.services import stopping
from flair_fl.services.memory import peak_rss_mb

log = logging.getLogger(__name__)
# A failed client's whole error (its traceback): <run dir>/clients.log (conf/config.yaml)
client_log = logging.getLogger("flair_fl.clients")
RoundHook = Callable[[int, ArrayRecord, dict[str, Any]], bool | None]
TIMEOUT_MARK, DIED_MARK = "client timed out", "client actor died"  # in error reasons
FAILURE_KINDS = ("raised", "timeout", "died", "rejected")


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


def _cohort_messages(
    arrays: ArrayRecord | None,
    config: dict[str, Any],
    users: list[str],
    node_ids: list[int],
    message_type: str,
) -> list[Message]:
    messages = []
    for index, (user, repeat) in enumerate(zip(users, repeat_indices(users), strict=True)):
        entry = {**config, "user-id": user, "cohort-index": index}
        if repeat:  # a sampler with replacement drew this user again
            entry["user-repeat"] = repeat
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


def _wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
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


def failure_kind(reply: Message) -> str:
    reason = reply.error.reason or ""
    if TIMEOUT_MARK in reason:
        return "timeout"
    if DIED_MARK in reason:
        return "died"
    return "raised"


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


@dataclass
class _RoundFold:
    """Folds one round's replies into its reduction and counts what failed, and why."""

    transport: MessageTransport
    reduction: Reduction
    metrics: MetricsReduction
    weight_key: str
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_KINDS, 0))
    template: Message | None = None
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
            return
        if reply.has_error():
            kind = failure_kind(reply)
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
            return
        record = reply.content.metric_records[METRICS_KEY]
        loss = float(record.get("train-loss", 0.0))  # type: ignore[arg-type]
        layout, flat = self.transport.reply_vector(reply)
        reason = (
            "a non-finite training loss"
            if not math.isfinite(loss)
            else self.reduction.add(layout, flat, float(record[self.weight_key]))  # type: ignore[arg-type]
        )
        if reason:
            self.failures["rejected"] += 1
            if self.fault_of(index) is not None:
                self.injected += 1
                reason = f"{reason} (injected fault, client.faults)"
            user = reply.content.config_records[META_KEY].get("user-id")
            log.warning("%s: update of user %s rejected: %s", self.round_label, user, reason)
            return
        self.metrics.add(record)
        if ARRAYS_KEY in reply.content.array_records:  # keep the metadata, free the update
            del reply.content.array_records[ARRAYS_KEY]
        self.accepted.append(reply)
        self.template = self.template or reply


def _injected(
    fault_of: Callable[[int, str], str | None], server_round: int, users: list[str], index: int
) -> str | None:
    return fault_of(server_round, users[index])


def _reduction_for(strategy: Strategy, weight_key: str) -> Reduction:
    make = getattr(strategy, "reduction", None)  # central DP clips every update first
    return make() if callable(make) else MeanReduction(weight_key)


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
    weight_key = str(getattr(strategy, "weighted_by_key", "uniform-weight"))
    transport = plan.transport
    for server_round in range(start_round, plan.num_rounds + 1):
        if stop := stopping.requested():
            log.warning("stopping before round %d: %s", server_round, stop.name)
            break
        if plan.should_stop and (reason := plan.should_stop(server_round)):
            outcome.stop_reason = reason
            log.warning("stopping before round %d: %s", server_round, reason)
            break
        started = time.perf_counter()
        server_lr = plan.before_round(server_round) if plan.before_round else None
        users = plan.sampler.sample(server_round)
        sampled = time.perf_counter()
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
        entries, inline = transport.publish("train", payload)
        messages = _cohort_messages(
            inline, {**config, **entries}, users, node_ids, MessageType.TRAIN
        )
        fold = _RoundFold(
            transport,
            _reduction_for(strategy, weight_key),
            MetricsReduction(weight_key),
            weight_key,
            round_label=f"round {server_round}",
        )
        if plan.fault_of is not None:
            fold.fault_of = functools.partial(_injected, plan.fault_of, server_round, users)
        sent = time.perf_counter()
        exchange(grid, messages, plan.round_timeout, plan.poll_interval, fold)
        if stop := stopping.requested():  # abandon the round: the model stays the last round's
            transport.end_round()
            log.warning("round %d abandoned: %s", server_round, stop.name)
            break
        received = time.perf_counter()
        summary = fold.metrics.result()
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
        elif fold.template is not None:
            if callable(observe := getattr(strategy, "observe_replies", None)):
                observe(server_round, fold.accepted)  # e.g. DP-SGD's per-user ledger
            new_arrays = fold.reduction.apply(strategy, server_round, summary, fold.template)
            if new_arrays is not None:
                arrays = new_arrays
        aggregated = time.perf_counter()
        transport.end_round()
        metrics: dict[str, Any] = {
            "train_loss": summary.get("train-loss", float("nan")),
            "train_steps": summary.get("num-steps", float("nan")),
            "train_images": summary.get("num-examples", 0.0),
            "clients_ok": ok,
            "clients_failed": plan.sampler.cohort_size - ok,
            **{f"clients_{kind}": n for kind, n in fold.failures.items()},
            "round_skipped": int(skipped),
            **({} if server_lr is None else {"server_lr": server_lr}),
            "time_sample_s": sampled - started,
            "time_send_s": sent - sampled,
            "time_wait_s": received - sent - fold.busy_s,
            "time_aggregate_s": fold.busy_s + aggregated - received,
            "client_load_s": summary.get("time-load", 0.0),
            "client_compute_s": summary.get("time-compute", 0.0),
            "client_reply_s": summary.get("time-reply", 0.0),
            "client_rss_mb": summary.get("peak-rss-mb", float("nan")),
            "client_gpu_mem_mb": summary.get("gpu-mem-mb", float("nan")),
            "driver_rss_mb": peak_rss_mb(),
        }
        if (
            on_fed_eval
            and not stopping.requested()  # the round is kept; its federated evaluation is not
            and plan.fed_eval_sampler
            and plan.fed_eval_every
            and server_round % plan.fed_eval_every == 0
        ):
            metrics.update(_federated_eval(grid, arrays, plan, server_round, node_ids, on_fed_eval))
        metrics["round_time_s"] = time.perf_counter() - started
        outcome.arrays, outcome.rounds_done = arrays, server_round
        if on_round(server_round, arrays, metrics) or outcome.diverged:
            if outcome.diverged:
                log.error("%s", outcome.stop_reason)
            break


def _federated_eval(
    grid: Grid,
    arrays: ArrayRecord,
    plan: RoundPlan,
    server_round: int,
    node_ids: list[int],
    on_fed_eval: Callable[[int, list[Message]], dict[str, Any]],
) -> dict[str, Any]:
    assert plan.fed_eval_sampler is not None
    eval_users = plan.fed_eval_sampler.sample(server_round, purpose="federated-eval")
    entries, inline = plan.transport.publish("eval", arrays)
    eval_msgs = _cohort_messages(
        inline,
        {"server-round": server_round, "split": "val", **entries},
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
        finally:
            plan.transport.close()

    return app
