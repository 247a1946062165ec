"""Tables across the jobs of a Hydra multirun: mean ± std of metrics over seeds per setting.

A job is a directory holding `.hydra/overrides.yaml` (its command-line overrides) and, when
it finished, `summary.json`. Jobs are grouped by their overrides minus the averaged-over keys
(`seed` by default); each group is one setting (one table row). The std is the sample
standard deviation (ddof=1, as numpy's `std(ddof=1)`), empty for a single value. Jobs with
no `summary.json` (failed: see their `error.txt`, or interrupted) are counted per setting.
`n` is the finished jobs of a setting; a cell that averages fewer (a metric some finished
jobs lack, e.g. no test split evaluated) says how many it averages: `0.4 ± 0.1 (n=2)`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flair_fl.artifacts.durable import write_atomically

DEFAULT_METRICS = (
    "best_val_macro_ap",
    "best_test_macro_ap",
    "best_test_micro_ap",
    "final_test_macro_ap",
    "final_test_micro_ap",
)
CSV_NAME, MARKDOWN_NAME = "sweep_summary.csv", "sweep_summary.md"
NOT_SETTINGS = {"resume"}  # a requeued job's resume=<its dir> (the submitit launchers)


@dataclass
class Job:
    """One job dir of a sweep: its overrides and summary (None if it did not finish)."""

    dir: Path
    overrides: list[str]
    summary: dict[str, Any] | None
    error: str | None = None  # last line of error.txt: the exception


@dataclass
class Row:
    """One setting: its varying override values, job counts and per-metric statistics."""

    setting: dict[str, str]
    done: int = 0
    failed: int = 0
    values: dict[str, list[float]] = field(default_factory=dict)

    def mean_std(self, metric: str) -> tuple[float | None, float | None]:
        """(mean, sample std) of a metric; None where there are too few values."""
        values = self.values.get(metric, [])
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else None
        return mean, std

    def count(self, metric: str) -> int:
        """How many jobs the metric's cell averages."""
        return len(self.values.get(metric, []))


@dataclass
class SweepTable:
    """The summary of a sweep: rows, the keys that vary, overrides common to every job."""

    metrics: list[str]
    over: list[str]
    keys: list[str]
    common: list[str]
    rows: list[Row]
    failures: list[Job]


def override_key(override: str) -> str:
    """`+a.b=1` -> `a.b` (the key an override sets, without its +/++/~ prefix)."""
    return override.split("=", 1)[0].lstrip("+~")


def _job_number(path: Path) -> tuple[int, str]:
    match = re.match(r"(\d+)", path.name)
    return (int(match.group(1)) if match else -1, str(path))


def warn(message: str) -> None:
    print(f"summarize: {message}", file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_summary(path: Path) -> dict[str, Any] | None:
    """A job's summary.json, or None if it is missing or cannot be parsed (a torn write)."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


def find_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job under `sweep_dir`, in job-number order."""
    jobs = []
    for overrides_path in Path(sweep_dir).rglob(".hydra/overrides.yaml"):
        job_dir = overrides_path.parent.parent
        summary_path, error_path = job_dir / "summary.json", job_dir / "error.txt"
        try:
            overrides = [str(o) for o in yaml.safe_load(overrides_path.read_text()) or []]
        except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError) as err:
            warn(f"{overrides_path}: cannot be read ({_first_line(err)}); job skipped")
            continue
        summary, error = _read_summary(summary_path), None
        if summary_path.is_file() and summary is None:
            error = "summary.json cannot be read (torn or damaged); job counted as failed"
            warn(f"{summary_path}: cannot be read; the job is counted as failed")
        elif error_path.is_file():
            lines = error_path.read_text(errors="replace").strip().splitlines()
            error = lines[-1] if lines else "error.txt is empty"
        jobs.append(Job(job_dir, overrides, summary, error))
    return sorted(jobs, key=lambda job: _job_number(job.dir))


def summarize(
    jobs: Sequence[Job], metrics: Sequence[str] = DEFAULT_METRICS, over: Iterable[str] = ("seed",)
) -> SweepTable:
    """Group jobs by their overrides minus the keys in `over`; collect each metric.

    A metric's mean and std use the jobs of the setting that report a finite value for it;
    metrics no job reports are left out of the table.
    """
    over = list(over)
    settings = [
        {override_key(o): o.split("=", 1)[1] if "=" in o else o for o in job.overrides}
        for job in jobs
    ]
    for setting in settings:
        for key in (set(over) | NOT_SETTINGS) & set(setting):
            del setting[key]
    all_keys = list(dict.fromkeys(key for setting in settings for key in setting))
    keys = [k for k in all_keys if len({s.get(k) for s in settings}) > 1]
    common = [f"{k}={settings[0][k]}" for k in all_keys if k not in keys]
    rows: dict[tuple[str, ...], Row] = {}
    for job, setting in zip(jobs, settings, strict=True):
        varying = {k: setting.get(k, "") for k in keys}
        row = rows.setdefault(tuple(varying.values()), Row(varying))
        if job.summary is None:
            row.failed += 1
            continue
        row.done += 1
        for metric in metrics:
            value = job.summary.get(metric)
            if isinstance(value, int | float) and math.isfinite(value):
                row.values.setdefault(metric, []).append(float(value))
    reported = [m for m in metrics if any(m in row.values for row in rows.values())]
    failures = [job for job in jobs if job.summary is None]
    return SweepTable(reported, over, keys, common, list(rows.values()), failures)


def _cell(row: Row, metric: str, digits: int) -> str:
    mean, std = row.mean_std(metric)
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")
    count = row.count(metric)
    return text if count == row.done else f"{text} (n={count})"


def table_rows(table: SweepTable, digits: int = 4) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the human-readable table: settings, counts, `mean ± std` cells."""
    header = [*table.keys, "n", "failed", *table.metrics]
    body = [
        [
            *row.setting.values(),
            str(row.done),
            str(row.failed),
            *(_cell(row, m, digits) for m in table.metrics),
        ]
        for row in table.rows
    ]
    return header, body


def _legend(table: SweepTable) -> str:
    over = ", ".join(table.over) or "nothing"
    return (
        f"Mean ± sample std (ddof=1) over {over}; n = finished jobs "
        "(a cell averaging fewer says its own n)"
    )


def format_text(table: SweepTable, digits: int = 4) -> str:
    """Fixed-width console table, with the common overrides above and failed jobs below."""
    header, body = table_rows(table, digits)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    rule = "  ".join("-" * width for width in widths)
    table_lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    ]
    lines = [_legend(table)]
    if table.common:
        lines.append("every job: " + " ".join(table.common))
    lines += ["", table_lines[0], rule, *table_lines[1:]]
    if table.failures:
        lines += ["", "jobs without summary.json (failed or interrupted):"]
        lines += [f"  {job.dir.name}: {job.error or 'no error.txt'}" for job in table.failures]
    return "\n".join(lines)


def format_markdown(table: SweepTable, digits: int = 4) -> str:
    """A markdown table with a line saying what the ± means."""
    header, body = table_rows(table, digits)
    lines = [
        _legend(table) + ".",
        *(["Every job: `" + " ".join(table.common) + "`."] if table.common else []),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(line) + " |" for line in body),
    ]
    return "\n".join(lines) + "\n"


def write_csv(table: SweepTable, path: Path) -> None:
    """Machine-readable: one line per setting, `<metric>_mean`/`<metric>_std` at full precision."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                *table.keys,
                "n",
                "failed",
                *(f"{m}_{s}" for m in table.metrics for s in ("mean", "std", "n")),
            ]
        )
        for row in table.rows:
            cells = []
            for metric in table.metrics:
                cells += ["" if v is None else repr(v) for v in row.mean_std(metric)]
                cells.append(str(row.count(metric)))
            writer.writerow([*row.setting.values(), row.done, row.failed, *cells])


def write_outputs(table: SweepTable, out_dir: Path, digits: int = 4) -> list[Path]:
    """Write `sweep_summary.csv` and `sweep_summary.md` into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / CSV_NAME, out_dir / MARKDOWN_NAME
    write_csv(table, csv_path)
    write_atomically(md_path, format_markdown(table, digits))
    return [csv_path, md_path]
