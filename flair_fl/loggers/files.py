"""Per-round metrics as JSON lines and CSV, fsynced to disk every round.

Every write goes through flair_fl.artifacts.durable: a round's line is appended and fsynced
(a failed append, say on a full disk, is truncated away so earlier lines stay parseable, and
the error names the file); rewrites (wider CSV header, resume, summary) replace the file atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from flair_fl.artifacts.durable import append_durably, write_atomically

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class FileLogger:
    """Writes `metrics.jsonl` (one object per round) and `metrics.csv` in `out_dir`.

    CSV columns are fixed by the first row plus `columns`; a later row with a new key
    rewrites the CSV with the wider header (rare: only the first evaluation adds keys when
    `columns` is not given).
    """

    def __init__(self, out_dir: str | Path, columns: list[str] | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path, self.csv_path = self.dir / "metrics.jsonl", self.dir / "metrics.csv"
        self.summary_path = self.dir / "summary.json"
        self.columns: list[str] = ["round", *(c for c in (columns or []) if c != "round")]
        self.rows: list[dict[str, Any]] = []

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        row = {"round": server_round, **{k: _clean(v) for k, v in metrics.items()}}
        append_durably(self.jsonl_path, json.dumps(row) + "\n")
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new or len(self.rows) == 1:
            self.columns += new
            self._rewrite_csv()
        else:
            append_durably(self.csv_path, self._csv_text([row], header=False))

    def resume_from(self, last_round: int) -> None:
        """A resumed run: keep the rows up to `last_round` (later ones, logged after the
        checkpoint and before the interruption, are recomputed identically) and append."""
        rows = read_metrics_rows(self.jsonl_path)
        self.rows = [r for r in rows if r["round"] <= last_round]
        for row in self.rows:
            self.columns += [k for k in row if k not in self.columns]
        write_atomically(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._rewrite_csv()

    def _csv_text(self, rows: list[dict[str, Any]], header: bool) -> str:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.columns)
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return text.getvalue()

    def _rewrite_csv(self) -> None:
        write_atomically(self.csv_path, self._csv_text(self.rows, header=True))

    def log_summary(self, summary: dict[str, Any]) -> None:
        clean = {k: _clean(v) for k, v in summary.items()}
        write_atomically(self.summary_path, json.dumps(clean, indent=2))

    def close(self) -> None:
        pass


def read_metrics_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (the process was killed while appending
    it) is dropped, a damaged line elsewhere is an error naming the file and line."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s: dropping a torn last line (%d bytes)", path, len(line))
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({err})") from err
    return rows


def file_logger(out_dir: str | Path, run_config: dict[str, Any] | None = None) -> FileLogger:
    """Factory for `logger=csv` (the resolved config is already in config_resolved.yaml)."""
    return FileLogger(out_dir)
