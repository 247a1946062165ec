"""One progress line per round with elapsed time and ETA."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ConsoleProgress:
    """Prints `round r/N | train loss | val AP | server lr | eps | elapsed | ETA` lines.

    Elapsed is the run's own clock, `metrics["elapsed_s"]` (metrics.csv's column, counted from
    the run's start) when the caller sets it, so the console and the files agree.
    The ETA extrapolates the mean duration of the rounds after the first one (which pays
    for Ray's actor start-up), so it is right from round 2 on.
    """

    def __init__(self, num_rounds: int, start_round: int = 1, unit: str = "round"):
        self.num_rounds, self.start_round, self.unit = num_rounds, start_round, unit
        self.started = time.perf_counter()
        self.first_round_done: float | None = None

    def line(self, server_round: int, metrics: dict[str, Any]) -> str:
        now = time.perf_counter()
        elapsed = float(metrics.get("elapsed_s", now - self.started))
        eta = "--:--"  # the first round pays Ray's start-up: no basis for an estimate yet
        if self.first_round_done is None:
            self.first_round_done = now
        else:
            per_round = (now - self.first_round_done) / (server_round - self.start_round)
            eta = _duration(per_round * (self.num_rounds - server_round))
        parts = [f"{self.unit} {server_round:>{len(str(self.num_rounds))}}/{self.num_rounds}"]
        if "train_loss" in metrics:
            parts.append(f"train loss {metrics['train_loss']:.4f}")
        if "val_macro_ap" in metrics:
            parts.append(
                f"val macro AP {metrics['val_macro_ap']:.4f} micro AP {metrics['val_micro_ap']:.4f}"
            )
        if "server_lr" in metrics:
            parts.append(f"server lr {metrics['server_lr']:.4g}")
        if "dp_epsilon" in metrics:
            parts.append(f"eps {metrics['dp_epsilon']:.3g}")
        if "dp_sgd_epsilon" in metrics:  # sample-level: the worst user's, composed so far
            parts.append(f"DP-SGD eps {metrics['dp_sgd_epsilon']:.3g}")
        if metrics.get("clients_failed"):
            parts.append(f"failed clients {metrics['clients_failed']}")
        parts.append(f"elapsed {_duration(elapsed)} ETA {eta}")
        return " | ".join(parts)

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        print(self.line(server_round, metrics), flush=True)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """The run's headline numbers, printed when it ends."""
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
