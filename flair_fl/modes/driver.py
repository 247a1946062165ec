"""Driver-side pieces shared by federated and centralized runs.

Building config nodes with clear errors, the model, central evaluation on a split, and the
per-round (per-epoch) bookkeeping: best-val model, loggers, console progress, summary.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, Message
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flair_fl.algorithms.fedprox import AdaptiveMu
from flair_fl.artifacts.checkpoint import atomic_save
from flair_fl.artifacts.durable import write_atomically
from flair_fl.artifacts.run_dir import RESULTS_NAME
from flair_fl.errors import ConfigError, FlairFormatError, RunStopped
from flair_fl.federated.protocol import METRICS_KEY, metric_state_from_record
from flair_fl.federated.round import LoopOutcome
from flair_fl.learning.evaluator import CentralEvaluator
from flair_fl.learning.metrics import MetricState
from flair_fl.loggers import LoggerErrors, RunLogger, SafeLogger, start_logger
from flair_fl.loggers.console import ConsoleProgress
from flair_fl.models.params import trainable_state
from flair_fl.privacy import Privacy
from flair_fl.services.stopping import StopSignal

log = logging.getLogger(__name__)


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with our own errors un-wrapped and bad values named.

    Hydra wraps every exception of a target in InstantiationException; a user should see
    "data.path=...: no prepared FLAIR HDF5 file" or "data: num_users must be >= 3", not a
    Hydra traceback.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError | FlairFormatError):
            raise cause from None
        if isinstance(cause, ValueError | TypeError):
            raise ConfigError(f"{key}: {cause}") from None
        raise


def build_loggers(cfg: DictConfig, out: Path) -> list[SafeLogger]:
    """Every logger of the `logger` group; each gets the run dir and the resolved config.

    Each runs behind a `SafeLogger`: a logger that fails is reported and counted in
    `summary["logger_errors"]`, and the run goes on.
    """
    run_config = OmegaConf.to_container(cfg, resolve=True)
    errors = LoggerErrors()
    loggers: list[SafeLogger] = []
    for name, node in cfg.logger.items():
        factory = build(node, f"logger.{name}", _partial_=True)  # run_config is data, not config
        loggers.append(start_logger(str(name), factory, errors, out_dir=out, run_config=run_config))
    return loggers


def make_model(cfg: DictConfig, num_labels: int) -> torch.nn.Module:
    """The configured model with `num_labels` outputs (errors name the model keys)."""
    factory = build(cfg.model, "model")
    try:
        model: torch.nn.Module = factory(num_classes=num_labels)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    return model


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def central_evaluator(
    cfg: DictConfig, model: torch.nn.Module, data: Any, device: torch.device
) -> CentralEvaluator:
    """The run's central evaluator (the `eval` group: batch, precision, where data lives)."""
    node = cfg.eval
    return CentralEvaluator(
        model,
        data,
        int(node.batch_size),
        device,
        precision=str(node.get("precision", "fp32")),
        placement=str(node.get("data_on", "auto")),
    )


class Checkpoint(Protocol):
    """Saves a run's checkpoint (experiment._checkpointer)."""

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None: ...

    def snapshot(self, server_round: int, arrays: ArrayRecord) -> Callable[[], None]:
        """Capture the round's server state now; the returned call writes it (with the
        tracker's state at that time)."""
        ...


@dataclass
class _PendingRound:
    """A round whose central evaluation runs in the background."""

    server_round: int
    arrays: ArrayRecord
    metrics: dict[str, Any]
    val: Future[dict[str, float]]
    save: Callable[[], None] | None  # its checkpoint, written once the evaluation is in


class RoundTracker:
    """Per-round (per-epoch) bookkeeping in the driver: central val evaluation every
    `eval_every` rounds and at the last, best-val model, loggers and console progress."""

    def __init__(
        self,
        num_rounds: int,
        eval_every: int,
        evaluator: CentralEvaluator,
        privacy: Privacy,
        loggers: Sequence[RunLogger],
        out: Path,
        initial_val: dict[str, float],
        test_at_end: bool = True,
        unit: str = "round",
        checkpoint_every: int = 0,
        overlap: bool = False,
    ):
        self.num_rounds, self.eval_every, self.test_at_end = num_rounds, eval_every, test_at_end
        self.unit, self.checkpoint_every = unit, checkpoint_every
        # Set by the federated run: saves a checkpoint for (round, global arrays).
        self.checkpoint: Checkpoint | None = None
        self.evaluator, self.privacy, self.loggers = evaluator, privacy, loggers
        self.out, self.initial_val = out, initial_val
        self.started = time.perf_counter()
        # Best val model over *trained* rounds ({} until one is evaluated): the untrained
        # model is never "best", so best_test_* always belongs to a trained model.
        self.best: dict[str, Any] = {}
        self.best_arrays: ArrayRecord | None = None
        self.progress = ConsoleProgress(num_rounds, unit=unit)
        self.diverged: str | None = None  # why the run stopped as diverged
        self.checkpointed_round = 0  # the round of the checkpoint on disk (0: none)
        # strategy=adafedprox: adapts the strategy's mu on the val metrics (its state is in
        # the tracker's, so a checkpoint written after the round holds the adapted mu)
        self.adaptive_mu: AdaptiveMu | None = None
        self.diverged_round = 0
        # eval.overlap: round r's evaluation runs in this thread while round r+1 trains;
        # round r is logged (and checkpointed) when it is in, before round r+2 is sent.
        self.background = (
            ThreadPoolExecutor(1, thread_name_prefix="central-eval") if overlap else None
        )
        self.pending: _PendingRound | None = None

    def _timed_val(self, arrays: ArrayRecord) -> dict[str, float]:
        started = time.perf_counter()
        val = self.evaluator(arrays, "val")
        return {**val, "time_eval_s": time.perf_counter() - started}

    def on_round(self, server_round: int, arrays: ArrayRecord, metrics: dict[str, Any]) -> bool:
        """Book a finished round; True stops the run (a divergence seen on val)."""
        if self.settle():  # an earlier round's evaluation stopped the run: this one is void
            return True
        metrics.update(self.privacy.round_metrics(server_round))
        if self.adaptive_mu is not None:
            metrics["proximal_mu"] = self.adaptive_mu.mu  # the mu this round trained with
        every = self.eval_every
        evaluates = (every and server_round % every == 0) or server_round == self.num_rounds
        every, checkpoint = self.checkpoint_every, self.checkpoint
        saves = checkpoint is not None and every and server_round % every == 0
        if evaluates and self.background is not None:
            # the strategy's and privacy's state are taken now, written once booked
            save = checkpoint.snapshot(server_round, arrays) if checkpoint and saves else None
            val = self.background.submit(self._timed_val, arrays)
            self.pending = _PendingRound(server_round, arrays, metrics, val, save)
            return False
        if evaluates:
            metrics.update(self._timed_val(arrays))
        save = checkpoint.snapshot(server_round, arrays) if checkpoint and saves else None
        return self._book(server_round, arrays, metrics, save)

    def settle(self) -> bool:
        """Wait for a background evaluation and book its round; True if it stopped the run."""
        pending, self.pending = self.pending, None
        if pending is None:
            return False
        pending.metrics.update(pending.val.result())
        return self._book(pending.server_round, pending.arrays, pending.metrics, pending.save)

    def _book(
        self,
        server_round: int,
        arrays: ArrayRecord,
        metrics: dict[str, Any],
        save: Callable[[], None] | None,
    ) -> bool:
        if "val_loss" in metrics:
            if not math.isfinite(metrics["val_loss"]):
                self.diverged_round = server_round
                self.diverged = (
                    f"training diverged in round {server_round}: the global model's val loss "
                    f"is {metrics['val_loss']}"
                )
            elif not self.best or metrics["val_macro_ap"] > self.best["val_macro_ap"]:
                self.best = {
                    "round": server_round,
                    **{k: v for k, v in metrics.items() if k.startswith("val_")},
                }
                self.best_arrays = arrays
                atomic_save(self.evaluator.model.state_dict(), self.out / "model_best.pt")
            if self.adaptive_mu is not None:
                self.adaptive_mu.observe(server_round, metrics)
        metrics["elapsed_s"] = time.perf_counter() - self.started
        self.progress.log_round(server_round, metrics)
        for logger in self.loggers:
            logger.log_round(server_round, metrics)
        if self.diverged:
            return True  # no checkpoint of a diverged model: the last one stays
        if save is not None:
            save()
        return False

    def close(self) -> None:
        """Book a round still being evaluated and stop the evaluation thread."""
        self.settle()
        if self.background is not None:
            self.background.shutdown()

    def abandon(self, outcome: LoopOutcome, reason: str, diverged: bool = True) -> None:
        """End a failed run (diverged, or no round trained): summary of what was done,
        loggers closed, no model written."""
        self.close()
        summary: dict[str, Any] = {
            "rounds": self.diverged_round or outcome.rounds_done,
            "stop_reason": reason,
            "diverged": diverged,
            **self._untrained_and_best(),
            "wall_time_s": time.perf_counter() - self.started,
        }
        for logger in self.loggers:
            logger.log_summary(summary)
            logger.close()
        write_results(summary, self.out)

    def stopped(self, outcome: LoopOutcome, stop: StopSignal, resume_hint: str) -> RunStopped:
        """End a run stopped by a signal: the last completed round checkpointed, loggers
        closed, no summary (the run is not finished); returns the error to raise."""
        self.close()  # a round still being evaluated is booked (and checkpointed) first
        done = outcome.rounds_done
        if self.checkpoint and outcome.arrays is not None and done > self.checkpointed_round:
            self.checkpoint(done, outcome.arrays)
        for logger in self.loggers:
            logger.close()
        kept = (
            f"checkpoint of round {self.checkpointed_round} kept; continue with `{resume_hint}`"
            if self.checkpointed_round
            else "no round was checkpointed (nothing to resume)"
        )
        return RunStopped(stop, f"after round {done} of {self.num_rounds}; {kept}")

    def _untrained_and_best(self) -> dict[str, Any]:
        """Summary keys: every untrained (round 0) val metric, and the best trained round's
        (`best_round` None when no trained round was evaluated)."""
        return {
            **{f"untrained_{k}": v for k, v in self.initial_val.items()},
            "best_round": self.best.get("round"),
            **{f"best_{k}": v for k, v in self.best.items() if k.startswith("val_")},
        }

    def _noise_multiplier(self) -> dict[str, Any]:
        z = self.privacy.describe().get("noise_multiplier")
        return {} if z is None else {"privacy_noise_multiplier": z}

    def state_dict(self) -> dict[str, Any]:
        """Best-val bookkeeping for checkpoints."""
        best = None if self.best_arrays is None else dict(self.best_arrays.to_torch_state_dict())
        state: dict[str, Any] = {"best": self.best, "best_arrays": best}
        if self.adaptive_mu is not None:
            state["adaptive_mu"] = self.adaptive_mu.state_dict()
        return state

    def resume(self, state: dict[str, Any], last_round: int) -> None:
        """Continue after `last_round`: best-val state back, metrics files cut to it."""
        # Checkpoints from before best-over-trained-rounds may hold the untrained model.
        self.best = state["best"] if state["best"].get("round") else {}
        if state["best_arrays"] is not None:
            self.best_arrays = ArrayRecord(state["best_arrays"])
        if self.adaptive_mu is not None:
            self.adaptive_mu.load_state_dict(state["adaptive_mu"])
        self.progress = ConsoleProgress(self.num_rounds, start_round=last_round + 1, unit=self.unit)
        for logger in self.loggers:
            resume_from = getattr(logger, "resume_from", None)
            if resume_from is not None:
                resume_from(last_round)

    def on_fed_eval(self, server_round: int, replies: list[Message]) -> dict[str, Any]:
        num_labels = self.evaluator.data.num_labels
        total = MetricState.zeros(num_labels)
        for reply in replies:
            record = reply.content.metric_records[METRICS_KEY]
            total = total + metric_state_from_record(record, num_labels)
        return {f"fedval_{k}": v for k, v in total.compute().items()}

    def finish(self, outcome: LoopOutcome) -> dict[str, Any]:
        """Final and test evaluation, model files, summary to loggers and console."""
        self.close()
        final = outcome.arrays
        if final is None:
            final = ArrayRecord(trainable_state(self.evaluator.model))
        elif self.checkpoint and outcome.rounds_done > self.checkpointed_round:
            self.checkpoint(outcome.rounds_done, final)
        summary: dict[str, Any] = {
            "rounds": outcome.rounds_done,
            "stop_reason": outcome.stop_reason,
        }
        final_val = self.evaluator(final, "val")
        if outcome.rounds_done and (
            not self.best or final_val["val_macro_ap"] > self.best["val_macro_ap"]
        ):  # the last round was not evaluated (stopped early) and beats the best so far
            self.best = {"round": outcome.rounds_done, **final_val}
            self.best_arrays = final
            atomic_save(self.evaluator.model.state_dict(), self.out / "model_best.pt")
        summary.update(self._untrained_and_best())
        summary.update({f"final_{k}": v for k, v in final_val.items()})
        atomic_save(self.evaluator.model.state_dict(), self.out / "model_final.pt")
        if self.test_at_end:  # as ml-flair: test with the best-val model, and the final one
            summary.update({f"final_{k}": v for k, v in self.evaluator(final, "test").items()})
            if self.best_arrays is not None:
                best_test = self.evaluator(self.best_arrays, "test")
                summary.update({f"best_{k}": v for k, v in best_test.items()})
        summary.update(
            {f"privacy_{k}": v for k, v in self.privacy.round_metrics(outcome.rounds_done).items()}
        )
        summary.update(self._noise_multiplier())
        summary["wall_time_s"] = time.perf_counter() - self.started
        for logger in self.loggers:
            logger.log_summary(summary)
            logger.close()
        write_results(summary, self.out)
        print_summary(summary, self.out)
        return summary


def write_results(summary: dict[str, Any], out: Path) -> None:
    """`results.json`: the run's headline numbers grouped by model (untrained, best-val,
    final) and split, next to the flat `summary.json` the loggers write. Written last: it
    marks the run finished (a resume then leaves the run dir as it is)."""
    groups: dict[str, dict[str, Any]] = {"untrained": {}, "best": {}, "final": {}}
    for key, value in summary.items():
        prefix, _, rest = key.partition("_")
        if prefix in groups and rest:
            groups[prefix][rest] = value
    results = {
        "rounds": summary.get("rounds"),
        "best_round": summary.get("best_round"),
        "stop_reason": summary.get("stop_reason"),
        **groups,
        "privacy": {
            k[len("privacy_") :]: v for k, v in summary.items() if k.startswith("privacy_")
        },
        "wall_time_s": summary.get("wall_time_s"),
    }
    write_atomically(out / RESULTS_NAME, json.dumps(results, indent=2, default=str))


def print_summary(summary: dict[str, Any], out: Path) -> None:
    rows = [
        (
            "val macro AP (untrained -> final)",
            f"{summary['untrained_val_macro_ap']:.4f} -> {summary['final_val_macro_ap']:.4f}",
        ),
        (
            "val micro AP (untrained -> final)",
            f"{summary['untrained_val_micro_ap']:.4f} -> {summary['final_val_micro_ap']:.4f}",
        ),
    ]
    if "best_val_macro_ap" in summary:
        rows.append(
            (
                "best val macro AP",
                f"{summary['best_val_macro_ap']:.4f} (round {summary['best_round']})",
            )
        )
    if "best_test_macro_ap" in summary:
        rows.append(
            (
                "test macro / micro AP (best-val model)",
                f"{summary['best_test_macro_ap']:.4f} / {summary['best_test_micro_ap']:.4f}",
            )
        )
    if "final_test_macro_ap" in summary:
        rows.append(
            (
                "test macro / micro AP (final model)",
                f"{summary['final_test_macro_ap']:.4f} / {summary['final_test_micro_ap']:.4f}",
            )
        )
    rows.append(("wall time", f"{summary['wall_time_s']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    print(
        "\n".join(
            [
                "",
                "flair-fl summary",
                *(f"  {k:<{width}}  {v}" for k, v in rows),
                f"  outputs: {out}",
            ]
        ),
        flush=True,
    )
