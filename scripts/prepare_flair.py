"""Convert FLAIR (a raw directory, real or synthetic, or parquet files) into one HDF5 file.

    python scripts/prepare_flair.py --dataset-dir data/flair --output data/flair.hdf5
    python scripts/prepare_flair.py --parquet data/flair_hf/data --output data/flair.hdf5
    python scripts/prepare_flair.py --dataset-dir data/flair --output data/flair_jpeg.hdf5 \\
        --store jpeg --workers 8

Layouts: `pfl` (pfl-research's per-user layout, the default), `mlflair` (ml-flair's per-user
layout) and `central` (ml-flair's one-group-per-image layout). Stores: `uint8` (decoded
pixels, ~80 GB for FLAIR; what every reader accepts) or `jpeg` (the original JPEG bytes,
~6 GB; per-user layouts, read by flair-fl only). A damaged dataset exits with status 2 and a
message naming the file and record at fault.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.prepare import LAYOUTS, STORES, prepare_flair, prepare_parquet
from flair_fl.data.raw import FlairFormatError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset-dir", help="raw FLAIR directory (labels_and_metadata.json, small_images/)"
    )
    source.add_argument(
        "--parquet", nargs="+", help="parquet files, or directories of them (apple/flair)"
    )
    parser.add_argument("--output", required=True, help="HDF5 file to write")
    parser.add_argument("--layout", choices=LAYOUTS, default="pfl")
    parser.add_argument("--store", choices=STORES, default="uint8", help="pixels or JPEG bytes")
    parser.add_argument(
        "--workers", type=int, default=0, help="JPEG-decoding threads (0: decode inline)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = {"layout": args.layout, "store": args.store, "workers": args.workers}
    start = time.perf_counter()
    try:
        if args.parquet:
            output = prepare_parquet(
                args.parquet, args.output, progress=not args.no_progress, **options
            )
        else:
            output = prepare_flair(
                args.dataset_dir, args.output, progress=not args.no_progress, **options
            )
    except (FlairFormatError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    reader = FlairHDF5(output)
    images = sum(sum(reader.population(split).values()) for split in reader.splits())
    size_mb = output.stat().st_size / 2**20
    print(
        f"wrote {output} ({args.layout} layout, {args.store} store, {size_mb:.1f} MiB): "
        f"{images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
