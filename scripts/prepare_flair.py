"""Convert a raw FLAIR directory (real or synthetic) into one HDF5 file.

    python scripts/prepare_flair.py --dataset-dir data/flair --output data/flair.hdf5

Layouts: `pfl` (pfl-research's per-user layout, the default), `mlflair` (ml-flair's per-user
layout) and `central` (ml-flair's one-group-per-image layout). A damaged dataset exits with
status 2 and a message naming the file and record at fault.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from flair_fl.data.prepare import LAYOUTS, prepare_flair
from flair_fl.data.raw import FlairFormatError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset-dir",
        required=True,
        help="raw FLAIR directory (labels_and_metadata.json, small_images/)",
    )
    parser.add_argument("--output", required=True, help="HDF5 file to write")
    parser.add_argument("--layout", choices=LAYOUTS, default="pfl")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        output = prepare_flair(
            args.dataset_dir, args.output, layout=args.layout, progress=not args.no_progress
        )
    except FlairFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    size_mb = output.stat().st_size / 2**20
    print(f"wrote {output} ({args.layout} layout, {size_mb:.1f} MiB) in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
