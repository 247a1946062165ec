"""Summarize a Hydra multirun: mean ± std over seeds per setting, as a table, CSV and markdown.

    python scripts/summarize.py outputs/multirun/2025-01-31/12-00-00
    python scripts/summarize.py <sweep dir> --metric final_test_macro_ap best_test_macro_ap
    python scripts/summarize.py <sweep dir> --over seed data.seed --out results/

Reads every job's `summary.json` and `.hydra/overrides.yaml`, groups jobs by their overrides
minus the `--over` keys (default: seed), prints one row per setting (std is the sample std,
ddof=1) and writes `sweep_summary.csv` and `sweep_summary.md` (default: into the sweep dir).
Jobs without `summary.json` are counted as failed and listed with their error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flair_fl.artifacts.summarize import (
    DEFAULT_METRICS,
    find_jobs,
    format_text,
    summarize,
    write_outputs,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir (hydra.sweep.dir)")
    parser.add_argument(
        "--metric",
        nargs="+",
        action="extend",
        help=f"summary.json keys to tabulate (default: {' '.join(DEFAULT_METRICS)})",
    )
    parser.add_argument(
        "--over",
        nargs="+",
        action="extend",
        help="override keys averaged over, not part of a setting (default: seed)",
    )
    parser.add_argument(
        "--out", type=Path, help="where to write the CSV/markdown (default: sweep dir)"
    )
    parser.add_argument("--digits", type=int, default=4, help="decimals in the printed table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = find_jobs(args.sweep_dir)
    if not jobs:
        print(
            f"summarize: no Hydra jobs (.hydra/overrides.yaml) under {args.sweep_dir}",
            file=sys.stderr,
        )
        return 2
    table = summarize(jobs, args.metric or DEFAULT_METRICS, args.over or ("seed",))
    print(format_text(table, args.digits))
    for path in write_outputs(table, args.out or args.sweep_dir, args.digits):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
