"""After-round work: central evaluation, then a list of callbacks given at construction.

The round loop calls `RoundTracker.after_round(server_round, arrays, metrics)` once per
completed round (True stops the run) and `on_fed_eval(server_round, replies)` after a
federated evaluation. For each round the tracker

1. books an earlier round whose evaluation ran in the background (eval.overlap), if any;
2. calls each callback's `before_eval`, in list order: metrics known when the round ends
   (privacy figures, the mu the round trained with), state to capture now (checkpoint);
3. evaluates the global model on val every `eval_every` rounds and at the last
   (`CentralEval`): in line, or in a background thread while the next round trains, the
   round then booked when its evaluation is in, before the round after next is sent;
4. marks the round diverged if its val loss is not finite (the run stops);
5. calls each callback's `after_eval`, in list order: adaptive mu, best-val model,
   loggers and console, checkpoint (not of a diverged model).

The run ends in one of three ways: `finish` (final and test evaluation, summary),
`abandon` (diverged or no round trained: summary of what was done, no model) or `stopped`
(a signal: last round checkpointed, no summary). The callbacks take part through
`rounds_over`, `summarize` and `close`; a checkpoint keeps the callbacks' `state_dict`s and
`resume` gives them back.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from flair_fl.algorithms.fedprox import AdaptiveMu
from flair_fl.artifacts.checkpoint import CHECKPOINT_NAME, atomic_save, save_checkpoint
from flair_fl.artifacts.run_dir import write_results
from flair_fl.federated.contract import ServerStrategy
from flair_fl.federated.round import LoopOutcome
from flair_fl.learning.evaluator import CentralEvaluator
from flair_fl.learning.metrics import MetricState
from flair_fl.loggers import RunLogger
from flair_fl.loggers.console import ConsoleProgress, print_summary
from flair_fl.models.params import trainable_state
from flair_fl.privacy import Privacy
from flair_fl.protocol import METRICS_KEY, metric_state_from_record


@dataclass
class Round:
    """A completed round as the callbacks see it; they may add to `metrics`."""

    number: int
    arrays: ArrayRecord
    metrics: dict[str, Any]
    diverged: bool = False  # its global val loss is not finite: the run stops after it


@dataclass(frozen=True)
class FinalModel:
    """The model a finished run ends with, and its val metrics."""

    rounds_done: int
    arrays: ArrayRecord
    val: dict[str, float]


class Callback:
    """After-round work; every hook is optional (these defaults do nothing)."""

    def before_eval(self, rnd: Round) -> None:
        """The round ended (the loop's thread, before its central evaluation)."""

    def after_eval(self, rnd: Round) -> None:
        """The round's metrics are complete (val included if it was evaluated)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback (keys unique among the callbacks)."""
        return {}

    def resume(self, state: dict[str, Any], last_round: int) -> None:
        """Continue after `last_round` of a checkpoint (`state`: every callback's)."""

    def rounds_over(self, rounds_done: int, arrays: ArrayRecord | None) -> None:
        """No more rounds run (the run finished or was stopped); `arrays`: the last
        completed round's model (None if no round ran)."""

    def summarize(self, summary: dict[str, Any], final: FinalModel | None) -> None:
        """Add to the run's summary (`final` is None when the run is abandoned)."""

    def close(self, summary: dict[str, Any] | None) -> None:
        """The run is over: `summary` is its summary (None: stopped, not finished)."""


class CentralEval:
    """Central evaluation on val every `every` rounds and at the last; with `overlap`
    (eval.overlap) round r's runs in a background thread while round r+1 trains."""

    def __init__(
        self, evaluator: CentralEvaluator, every: int, num_rounds: int, overlap: bool = False
    ):
        self.evaluator, self.every, self.num_rounds = evaluator, every, num_rounds
        self.background = (
            ThreadPoolExecutor(1, thread_name_prefix="central-eval") if overlap else None
        )

    def due(self, server_round: int) -> bool:
        every = self.every
        return bool(every and server_round % every == 0) or server_round == self.num_rounds

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        started = time.perf_counter()
        val = self.evaluator(arrays, "val")
        return {**val, "time_eval_s": time.perf_counter() - started}

    def submit(self, arrays: ArrayRecord) -> Future[dict[str, float]]:
        assert self.background is not None
        return self.background.submit(self, arrays)

    def shutdown(self) -> None:
        if self.background is not None:
            self.background.shutdown()


class PrivacyMetrics(Callback):
    """The privacy mechanism's per-round figures (epsilon spent, clip norm, ...) in each
    round's metrics, and its totals in the summary."""

    def __init__(self, privacy: Privacy):
        self.privacy = privacy

    def before_eval(self, rnd: Round) -> None:
        rnd.metrics.update(self.privacy.round_metrics(rnd.number))

    def summarize(self, summary: dict[str, Any], final: FinalModel | None) -> None:
        if final is None:
            return
        figures = self.privacy.round_metrics(final.rounds_done)
        summary.update({f"privacy_{k}": v for k, v in figures.items()})
        z = self.privacy.describe().get("noise_multiplier")
        if z is not None:
            summary["privacy_noise_multiplier"] = z


class AdaptMu(Callback):
    """strategy=adafedprox: each round logs the mu it trained with; mu adapts on the
    central val metrics, the untrained model's (`initial_val`) first. Its state is
    checkpointed (a resumed run replaces it), so a resumed run adapts alike."""

    def __init__(self, adaptive_mu: AdaptiveMu, initial_val: dict[str, float]):
        self.adaptive_mu = adaptive_mu
        adaptive_mu.observe(0, initial_val)

    def before_eval(self, rnd: Round) -> None:
        rnd.metrics["proximal_mu"] = self.adaptive_mu.mu

    def after_eval(self, rnd: Round) -> None:
        if "val_loss" in rnd.metrics:
            self.adaptive_mu.observe(rnd.number, rnd.metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"adaptive_mu": self.adaptive_mu.state_dict()}

    def resume(self, state: dict[str, Any], last_round: int) -> None:
        self.adaptive_mu.load_state_dict(state["adaptive_mu"])


class BestModel(Callback):
    """The best-val model over *trained* rounds (`model_best.pt`): the untrained model is
    never "best", so best_test_* always belongs to a trained model."""

    def __init__(self, evaluator: CentralEvaluator, out: Path, test_at_end: bool = True):
        self.evaluator, self.out, self.test_at_end = evaluator, out, test_at_end
        self.best: dict[str, Any] = {}  # {} until a trained round is evaluated
        self.best_arrays: ArrayRecord | None = None

    def _better(self, val: dict[str, Any]) -> bool:
        return not self.best or val["val_macro_ap"] > self.best["val_macro_ap"]

    def _take(self, server_round: int, val: dict[str, Any], arrays: ArrayRecord) -> None:
        self.best = {
            "round": server_round,
            **{k: v for k, v in val.items() if k.startswith("val_")},
        }
        self.best_arrays = arrays
        # the evaluator's model holds `arrays`: it has just evaluated them
        atomic_save(self.evaluator.model.state_dict(), self.out / "model_best.pt")

    def after_eval(self, rnd: Round) -> None:
        if "val_loss" in rnd.metrics and not rnd.diverged and self._better(rnd.metrics):
            self._take(rnd.number, rnd.metrics, rnd.arrays)

    def state_dict(self) -> dict[str, Any]:
        best = None if self.best_arrays is None else dict(self.best_arrays.to_torch_state_dict())
        return {"best": self.best, "best_arrays": best}

    def resume(self, state: dict[str, Any], last_round: int) -> None:
        # Checkpoints from before best-over-trained-rounds may hold the untrained model.
        self.best = state["best"] if state["best"].get("round") else {}
        if state["best_arrays"] is not None:
            self.best_arrays = ArrayRecord(state["best_arrays"])

    def summarize(self, summary: dict[str, Any], final: FinalModel | None) -> None:
        if final is not None and final.rounds_done and self._better(final.val):
            # the last round was not evaluated (stopped early) and beats the best so far
            self._take(final.rounds_done, final.val, final.arrays)
        summary["best_round"] = self.best.get("round")
        summary.update({f"best_{k}": v for k, v in self.best.items() if k.startswith("val_")})
        if final is not None and self.test_at_end and self.best_arrays is not None:
            best_test = self.evaluator(self.best_arrays, "test")  # as ml-flair
            summary.update({f"best_{k}": v for k, v in best_test.items()})


class LogRounds(Callback):
    """Each round to every logger and to the console (`elapsed_s`: the run's own clock);
    the summary to every logger at the end."""

    def __init__(
        self, loggers: Sequence[RunLogger], num_rounds: int, started: float, unit: str = "round"
    ):
        self.loggers, self.num_rounds, self.started, self.unit = loggers, num_rounds, started, unit
        self.progress = ConsoleProgress(num_rounds, unit=unit)

    def after_eval(self, rnd: Round) -> None:
        rnd.metrics["elapsed_s"] = time.perf_counter() - self.started
        self.progress.log_round(rnd.number, rnd.metrics)
        for logger in self.loggers:
            logger.log_round(rnd.number, rnd.metrics)

    def resume(self, state: dict[str, Any], last_round: int) -> None:
        self.progress = ConsoleProgress(self.num_rounds, start_round=last_round + 1, unit=self.unit)
        for logger in self.loggers:
            resume_from = getattr(logger, "resume_from", None)
            if resume_from is not None:
                resume_from(last_round)  # metrics files cut to the checkpoint's round

    def flush(self) -> None:
        """Write what was logged for good (before a checkpoint covers it)."""
        for logger in self.loggers:
            flush = getattr(logger, "flush", None)
            if flush is not None:
                flush()

    def close(self, summary: dict[str, Any] | None) -> None:
        for logger in self.loggers:
            if summary is not None:
                logger.log_summary(summary)
            logger.close()


class Checkpoint(Callback):
    """`<out>/checkpoint.pt` every `every` rounds (0: at the end only) and when the rounds
    are over: weights, strategy, privacy, the `keeps` callbacks' state, config.

    A round's server state (strategy, privacy, RNGs) is captured when the round ends and
    written once its metrics are complete (with an overlapped evaluation, when that is in):
    the next round changes the states in place, so they are copied.
    """

    def __init__(
        self,
        out: Path,
        every: int,
        config: dict[str, Any],
        strategy: ServerStrategy,
        privacy: Privacy,
        keeps: Sequence[Callback],
        logs: LogRounds,
        initial_val: dict[str, float],
    ):
        self.path, self.every, self.config = out / CHECKPOINT_NAME, every, config
        self.strategy, self.privacy, self.keeps, self.logs = strategy, privacy, keeps, logs
        self.initial_val = initial_val
        self.saved_round = 0  # the round of the checkpoint on disk (0: none)
        self._pending: dict[int, Callable[[], None]] = {}

    def snapshot(self, server_round: int, arrays: ArrayRecord) -> Callable[[], None]:
        """Capture the round's server state now; the returned call writes it (with the
        kept callbacks' state at that time)."""
        state = {
            "round": server_round,
            "arrays": dict(arrays.to_torch_state_dict()),
            "strategy": copy.deepcopy(self.strategy.state_dict()),
            "privacy": copy.deepcopy(self.privacy.state_dict()),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        }

        def write() -> None:
            self.logs.flush()  # first: what the checkpoint covers is logged for good
            kept: dict[str, Any] = {}
            for callback in self.keeps:
                kept.update(callback.state_dict())
            save_checkpoint(
                {**state, "tracker": kept, "initial_val": self.initial_val, "config": self.config},
                self.path,
            )
            self.saved_round = server_round

        return write

    def before_eval(self, rnd: Round) -> None:
        if self.every and rnd.number % self.every == 0:
            self._pending[rnd.number] = self.snapshot(rnd.number, rnd.arrays)

    def after_eval(self, rnd: Round) -> None:
        write = self._pending.pop(rnd.number, None)
        if write is not None and not rnd.diverged:  # the last good checkpoint stays
            write()

    def resume(self, state: dict[str, Any], last_round: int) -> None:
        self.saved_round = last_round

    def rounds_over(self, rounds_done: int, arrays: ArrayRecord | None) -> None:
        if arrays is not None and rounds_done > self.saved_round:
            self.snapshot(rounds_done, arrays)()


class RoundTracker:
    """The after-round seam of the round loop (module doc): central evaluation, then the
    callbacks, in order; divergence on val stops the run."""

    def __init__(
        self,
        evaluation: CentralEval,
        callbacks: Sequence[Callback],
        initial_val: dict[str, float],
        out: Path,
        started: float,
        test_at_end: bool = True,
    ):
        self.evaluation, self.callbacks = evaluation, list(callbacks)
        self.initial_val, self.out, self.started = initial_val, out, started
        self.test_at_end = test_at_end
        self.diverged: str | None = None  # why the run stopped as diverged
        self.diverged_round = 0
        # eval.overlap: the round being evaluated in the background, and its evaluation
        self.pending: tuple[Round, Future[dict[str, float]]] | None = None

    def after_round(self, server_round: int, arrays: ArrayRecord, metrics: dict[str, Any]) -> bool:
        """Book a finished round; True stops the run (a divergence seen on val)."""
        if self.settle():  # an earlier round's evaluation stopped the run: this one is void
            return True
        rnd = Round(server_round, arrays, metrics)
        for callback in self.callbacks:
            callback.before_eval(rnd)
        if not self.evaluation.due(server_round):
            return self._book(rnd)
        if self.evaluation.background is not None:
            self.pending = (rnd, self.evaluation.submit(arrays))
            return False
        metrics.update(self.evaluation(arrays))
        return self._book(rnd)

    def settle(self) -> bool:
        """Wait for a background evaluation and book its round; True if it stopped the run."""
        pending, self.pending = self.pending, None
        if pending is None:
            return False
        rnd, val = pending
        rnd.metrics.update(val.result())
        return self._book(rnd)

    def _book(self, rnd: Round) -> bool:
        val_loss = rnd.metrics.get("val_loss")
        if val_loss is not None and not math.isfinite(val_loss):
            rnd.diverged = True
            self.diverged_round = rnd.number
            self.diverged = (
                f"training diverged in round {rnd.number}: the global model's val loss "
                f"is {val_loss}"
            )
        for callback in self.callbacks:
            callback.after_eval(rnd)
        return rnd.diverged

    def on_fed_eval(self, server_round: int, replies: list[Message]) -> dict[str, Any]:
        """The federated evaluation's metrics, summed over the clients' metric states."""
        num_labels = self.evaluation.evaluator.data.num_labels
        total = MetricState.zeros(num_labels)
        for reply in replies:
            record = reply.content.metric_records[METRICS_KEY]
            total = total + metric_state_from_record(record, num_labels)
        return {f"fedval_{k}": v for k, v in total.compute().items()}

    def resume(self, state: dict[str, Any], last_round: int) -> None:
        """Continue after `last_round` of a checkpoint whose tracker state is `state`."""
        for callback in self.callbacks:
            callback.resume(state, last_round)

    def close(self) -> None:
        """Book a round still being evaluated and stop the evaluation thread."""
        self.settle()
        self.evaluation.shutdown()

    def _untrained(self) -> dict[str, Any]:
        return {f"untrained_{k}": v for k, v in self.initial_val.items()}

    def abandon(self, outcome: LoopOutcome, reason: str, diverged: bool = True) -> None:
        """End a failed run (diverged, or no round trained): summary of what was done,
        loggers closed, no model written."""
        self.close()
        summary: dict[str, Any] = {
            "rounds": self.diverged_round or outcome.rounds_done,
            "stop_reason": reason,
            "diverged": diverged,
            **self._untrained(),
        }
        for callback in self.callbacks:
            callback.summarize(summary, None)
        summary["wall_time_s"] = time.perf_counter() - self.started
        for callback in self.callbacks:
            callback.close(summary)
        write_results(summary, self.out)

    def stopped(self, outcome: LoopOutcome) -> None:
        """End a run stopped by a signal: the last completed round checkpointed, loggers
        closed, no summary (the run is not finished)."""
        self.close()  # a round still being evaluated is booked (and checkpointed) first
        for callback in self.callbacks:
            callback.rounds_over(outcome.rounds_done, outcome.arrays)
        for callback in self.callbacks:
            callback.close(None)

    def finish(self, outcome: LoopOutcome) -> dict[str, Any]:
        """Final and test evaluation, model files, summary to loggers and console."""
        self.close()
        for callback in self.callbacks:
            callback.rounds_over(outcome.rounds_done, outcome.arrays)
        evaluator = self.evaluation.evaluator
        final = outcome.arrays
        if final is None:
            final = ArrayRecord(trainable_state(evaluator.model))
        summary: dict[str, Any] = {
            "rounds": outcome.rounds_done,
            "stop_reason": outcome.stop_reason,
            **self._untrained(),
        }
        final_val = evaluator(final, "val")
        summary.update({f"final_{k}": v for k, v in final_val.items()})
        atomic_save(evaluator.model.state_dict(), self.out / "model_final.pt")
        if self.test_at_end:  # as ml-flair: test with the final model, and the best-val one
            summary.update({f"final_{k}": v for k, v in evaluator(final, "test").items()})
        for callback in self.callbacks:
            callback.summarize(summary, FinalModel(outcome.rounds_done, final, final_val))
        summary["wall_time_s"] = time.perf_counter() - self.started
        for callback in self.callbacks:
            callback.close(summary)
        write_results(summary, self.out)
        print_summary(summary, self.out)
        return summary
