"""Download FLAIR: Apple's release (default) or the Hugging Face parquet copy.

    python scripts/download_flair.py --dataset-dir data/flair
    python scripts/download_flair.py --dataset-dir data/flair_hf --source huggingface

Apple's release: labels_and_metadata.json, label_relationship.txt and 43 tarballs of 256 px
images (~6 GB), extracted to small_images/ and then deleted (keep them with
--keep-archives); --raw adds the full-size originals (~1.2 TB). Hugging Face: the parquet
files of `apple/flair` under DIR/data/ (~6 GB; prepare them with
`scripts/prepare_flair.py --parquet DIR/data`). Interrupted runs resume; transient errors
are retried with exponential backoff. Apple publishes no checksums (files are checked by size,
gzip CRC and content); Hugging Face lists a SHA-256 per file, which is checked.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from flair_fl.data.download import RetryPolicy
from flair_fl.data.release import (
    APPLE_BASE_URL,
    HF_ENDPOINT,
    HF_REPO,
    dataset_root,
    download_flair,
    download_hub_parquet,
)
from flair_fl.errors import DownloadError, FlairFormatError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-dir", required=True, type=Path, help="directory to fill")
    parser.add_argument("--source", choices=("apple", "huggingface"), default="apple")
    parser.add_argument("--raw", action="store_true", help="also the full-size images (~1.2 TB)")
    parser.add_argument("--base-url", default=APPLE_BASE_URL, help="Apple release base URL")
    parser.add_argument("--keep-archives", action="store_true", help="keep the tarballs")
    parser.add_argument(
        "--sha256sums",
        type=Path,
        help="`sha256sum` output to check the tarballs against (Apple publishes none)",
    )
    parser.add_argument("--hf-endpoint", default=HF_ENDPOINT, help="Hugging Face Hub URL")
    parser.add_argument("--hf-repo", default=HF_REPO)
    parser.add_argument("--revision", default="main", help="Hub revision (branch/commit)")
    parser.add_argument("--workers", type=int, default=4, help="parallel transfers")
    parser.add_argument("--attempts", type=int, default=6, help="tries per file")
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry delay (s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout (s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def read_sha256sums(path: Path) -> dict[str, str]:
    """{file name: digest} from `sha256sum` output lines (`<hex>  <name>`)."""
    sums: dict[str, str] = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise FlairFormatError(f"--sha256sums {path}: cannot be read ({reason})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise FlairFormatError(f"{path}: line {number} is not `<sha256>  <file>`: {line!r}")
        sums[Path(parts[1].lstrip("*")).name] = parts[0].lower()
    return sums


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    progress = not args.no_progress
    try:
        policy = RetryPolicy(args.attempts, args.backoff, args.timeout)
        if args.source == "huggingface":
            files = download_hub_parquet(
                args.dataset_dir,
                args.hf_endpoint,
                args.hf_repo,
                args.revision,
                os.environ.get("HF_TOKEN"),
                args.workers,
                policy,
                progress,
            )
            print(f"downloaded {len(files)} parquet files to {args.dataset_dir}; next:")
            print(f"  python scripts/prepare_flair.py --parquet {args.dataset_dir} --output FILE")
            return 0
        if args.raw:
            dataset_root(args.dataset_dir)
            free = shutil.disk_usage(args.dataset_dir).free / 1e12
            print(f"{'!' * 80}\n--raw: {free:.2f} TB free in {args.dataset_dir}", file=sys.stderr)
        checksums = read_sha256sums(args.sha256sums) if args.sha256sums else None
        summary = download_flair(
            args.dataset_dir,
            args.base_url,
            args.raw,
            args.workers,
            args.keep_archives,
            checksums,
            policy,
            progress,
        )
    except (DownloadError, FlairFormatError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # anything else the file system refused: one line, the file named
        print(f"error: {err.filename or args.dataset_dir}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(
        f"FLAIR in {summary.dataset_dir}: {summary.images} images of {summary.users} users "
        f"({summary.archives_extracted} archives extracted now); next:\n"
        f"  python scripts/prepare_flair.py --dataset-dir {summary.dataset_dir} --output FILE"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
