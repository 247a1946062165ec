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
import io
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TextIO

from flair_fl.artifacts.durable import NO_SPACE
from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.prepare import LAYOUTS, STORES, prepare_flair, prepare_parquet, write_failure
from flair_fl.errors import FlairFormatError


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
    parser.add_argument(
        "--checksum",
        action="store_true",
        help="HDF5 fletcher32 checksums (a CRC-32 per JPEG): damage is detected on read",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def _prepare(args: argparse.Namespace) -> Path:
    options = {"layout": args.layout, "store": args.store, "workers": args.workers}
    progress, checksum = not args.no_progress, args.checksum
    if args.parquet:
        return prepare_parquet(
            args.parquet, args.output, progress=progress, checksum=checksum, **options
        )
    return prepare_flair(
        args.dataset_dir, args.output, progress=progress, checksum=checksum, **options
    )


class _H5CloseNoise(io.TextIOBase):
    """The child's stderr: passes everything through (the progress bar, real errors) except
    the tracebacks h5py prints when closing objects after a failed write, which go to
    `report` (the parent turns them into one line)."""

    def __init__(self, out: TextIO, report: Callable[[str], None]):
        self.out, self.report, self.block = out, report, ""

    def write(self, text: str) -> int:
        if not self.block and not text.startswith(("Traceback", "Exception ignored")):
            return self.out.write(text)
        self.block += text
        last = self.block.rstrip("\n").splitlines()[-1]
        if self.block.endswith("\n") and not last.startswith((" ", "Traceback")):
            block, self.block = self.block, ""  # complete: header, frames, exception
            if "h5py" in block:
                self.report(last)
            else:
                self.out.write(block)
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def _child(args: argparse.Namespace, conn: Connection) -> None:
    """Prepare, send ("ok", path) or ("error", message), and leave at once: after a failed
    write the HDF5 library may crash while cleaning up, so it never gets the chance. h5py's
    failures while closing objects ("Exception ignored") go to the parent, not the console."""
    sys.unraisablehook = lambda hook: conn.send(("ignored", str(hook.exc_value)))
    sys.stderr = _H5CloseNoise(sys.stderr, lambda line: conn.send(("ignored", line)))
    try:
        conn.send(("ok", str(_prepare(args))))
    except (FlairFormatError, ValueError, ImportError, OSError) as err:
        message = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        conn.send(("error", message))
    except BaseException as err:  # a bug: its traceback, then status 1
        traceback.print_exc()
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def prepare_isolated(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """(output, None) or (None, one-line error): preparation runs in a forked child, so a
    crash of the HDF5 library (a full disk can cause one) still ends in one clear line and
    no `.partial` left behind."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(args, send))
    child.start()
    send.close()
    status, value, ignored = "error", None, []
    try:
        while (message := receive.recv())[0] == "ignored":
            ignored.append(message[1])
        status, value = message
    except EOFError:  # the child died without a word (a crash in the HDF5 library)
        pass
    child.join()
    if status == "ok" and value is not None:
        return Path(value), None
    output = Path(args.output)
    partial = output.with_name(output.name + ".partial")
    partial.unlink(missing_ok=True)
    if value is None:
        failures = [write_failure(output, partial, RuntimeError(text)) for text in ignored]
        full = [f for f in failures if f.errno in NO_SPACE]
        value = (
            str(full[0])
            if full
            else str(failures[0])
            if failures
            else (
                f"{output}: preparation stopped (exit status {child.exitcode}) while writing "
                f"{partial}, removed; is the disk full?"
            )
        )
    return None, value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    output, error = prepare_isolated(args)
    if output is None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    reader = FlairHDF5(output)
    images = sum(sum(reader.population(split).values()) for split in reader.splits())
    size_mb = output.stat().st_size / 2**20
    print(
        f"wrote {output} ({args.layout} layout, {args.store} store"
        f"{', checksums' if args.checksum else ''}, {size_mb:.1f} MiB): "
        f"{images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
