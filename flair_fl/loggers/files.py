"""Per-round metrics as JSON lines and CSV, flushed to disk every round."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any


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
        self.rows.append(row)
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        new = [k for k in row if k not in self.columns]
        if new or len(self.rows) == 1:
            self.columns += new
            self._rewrite_csv()
        else:
            with self.csv_path.open("a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)

    def resume_from(self, last_round: int) -> None:
        """A resumed run: keep the rows up to `last_round` (later ones, logged after the
        checkpoint and before the interruption, are recomputed identically) and append."""
        rows = []
        if self.jsonl_path.is_file():
            rows = [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line]
        self.rows = [r for r in rows if r["round"] <= last_round]
        for row in self.rows:
            self.columns += [k for k in row if k not in self.columns]
        tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.jsonl_path)
        self._rewrite_csv()

    def _rewrite_csv(self) -> None:
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def log_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2))
        os.replace(tmp, self.summary_path)

    def close(self) -> None:
        pass


def file_logger(out_dir: str | Path, run_config: dict[str, Any] | None = None) -> FileLogger:
    """Factory for `logger=csv` (the resolved config is already in config_resolved.yaml)."""
    return FileLogger(out_dir)
