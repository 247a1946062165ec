"""CLI: python -m flair_fl.explore <raw dir or HDF5> [--out DIR] [--split S] [--user U] ..."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flair_fl.errors import FlairFormatError
from flair_fl.explore.pipeline import explore
from flair_fl.explore.stats import ALL_SPLITS

DEFAULT_OUT_ROOT = Path("outputs/explore")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m flair_fl.explore",
        description="Print FLAIR dataset statistics and write a report (PNG figures + "
        "report.md) from a raw FLAIR directory or a prepared HDF5 file (any layout).",
    )
    parser.add_argument("data", type=Path, help="raw FLAIR directory or prepared .hdf5 file")
    parser.add_argument(
        "--out", type=Path, help=f"report directory (default: {DEFAULT_OUT_ROOT}/<data name>)"
    )
    parser.add_argument("--split", default=ALL_SPLITS, choices=["train", "val", "test", ALL_SPLITS])
    parser.add_argument("--user", help="draw the sample images from this user only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample-image draw")
    parser.add_argument(
        "--relationship",
        type=Path,
        help="label_relationship.txt for the "
        "fine -> coarse summary of an HDF5 input (default: inferred)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    out = args.out or DEFAULT_OUT_ROOT / args.data.resolve().name.removesuffix(".hdf5")
    try:
        result = explore(args.data, out, args.split, args.user, args.seed, args.relationship)
    except FlairFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.summary)
    print(f"\nreport: {result.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
