"""PNG plots of a run in its run dir: val AP and losses over rounds (matplotlib, Agg).

Figures are made with `Figure` + `FigureCanvasAgg`, never pyplot, so no global state is
touched (safe in sweeps that run many jobs in one process, and with no display).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from flair_fl.loggers.files import read_metrics_rows

# (file name, title, y label, [(metric key, legend label), ...])
PLOTS: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "val_ap.png",
        "Central val averaged precision",
        "AP",
        (("val_macro_ap", "val macro AP"), ("val_micro_ap", "val micro AP")),
    ),
    ("loss.png", "Losses", "loss", (("train_loss", "train loss"), ("val_loss", "val loss"))),
)


def _series(rows: Mapping[int, Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of `key` over the rounds where it is a finite number."""
    points = [
        (r, float(row[key]))
        for r, row in sorted(rows.items())
        if isinstance(row.get(key), numbers.Real) and math.isfinite(row[key])
    ]
    return [r for r, _ in points], [v for _, v in points]


def write_plots(rows: Mapping[int, Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the PNGs of `PLOTS` for {round: metrics}; a plot with no data is skipped.

    Returns the paths written. Each file is replaced atomically (a kill mid-write leaves the
    previous plot).
    """
    written = []
    for file_name, title, y_label, curves in PLOTS:
        series = [(label, *_series(rows, key)) for key, label in curves]
        if not any(rounds for _, rounds, _ in series):
            continue
        figure = Figure(figsize=(6.4, 4.0), dpi=100)
        canvas = FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for label, rounds, values in series:
            if rounds:
                axes.plot(rounds, values, marker="o" if len(rounds) < 30 else None, label=label)
        axes.set(title=title, xlabel="round", ylabel=y_label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = Path(out_dir) / file_name
        tmp = path.with_suffix(".tmp.png")
        canvas.print_png(str(tmp))
        os.replace(tmp, path)
        written.append(path)
    return written


def read_metrics_jsonl(path: Path) -> dict[int, dict[str, Any]]:
    """{round: metrics} from a `metrics.jsonl` (later lines win for a repeated round)."""
    return {int(row["round"]): row for row in read_metrics_rows(path)}


class PlotLogger:
    """Keeps every round's metrics and writes the plots at the summary and on close.

    A resumed run dir starts from the rounds already in its `metrics.jsonl`, so the plots
    cover the whole run; a round logged again after a resume replaces the earlier one.
    """

    def __init__(self, out_dir: str | Path, run_config: dict[str, Any] | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows = read_metrics_jsonl(self.dir / "metrics.jsonl")
        self.stale = False

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        self.rows[server_round] = dict(metrics)
        self.stale = True

    def resume_from(self, last_round: int) -> None:
        """A resumed run: rounds after its checkpoint will be logged again."""
        self.rows = {r: row for r, row in self.rows.items() if r <= last_round}

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Plot, with the untrained model's val AP as round 0."""
        untrained = {
            key: summary[f"untrained_{key}"]
            for key in ("val_macro_ap", "val_micro_ap")
            if f"untrained_{key}" in summary
        }
        if untrained and 0 not in self.rows:
            self.rows[0] = untrained
        self.write()

    def close(self) -> None:
        if self.stale:  # a job that failed before its summary still gets its plots
            self.write()

    def write(self) -> list[Path]:
        self.stale = False
        return write_plots(self.rows, self.dir)
