"""Data-path benchmark: the old per-image path against the batched one, side by side.

python scripts/bench_data.py --mode train --name cpu-data-train
python scripts/bench_data.py --mode train --name gpu-data-train --devices cpu cuda
python scripts/bench_data.py --mode eval --name cpu-data-eval

`--mode train`: training's data path (read, decode, augment; no model) for the uint8 and the
compact JPEG store, 256 px stored -> 224 px input: CPU ms per trained image (process CPU
time) and images/s, old and new interleaved. Writes benchmarks/results/<name>.json and .md
with the machine, the command and the load average.

`--mode eval`: central evaluation of a synthetic val split (256 px stored -> 224 px input),
the per-image path (HDF5 re-read, per-image CPU transforms) against the in-memory path (read
and resized once, batched normalisation on the device), paired repeats, for the uint8 and the
JPEG store and each of `--models` (default: meanpool, a near-free model that leaves the data
path to time, and smallcnn); the same metrics from both (their largest difference is
reported).

`--mode contention`: `--clients` training processes run the client's path on the first of
`--models` without pause while the driver sleeps, evaluates back to back (as `eval.overlap`
does), then sleeps again: the clients' images/s in each phase says whether the evaluation
starves them. On the last device of `--devices`. Not part of `--mode all` (train and eval).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from flair_fl.bench.contention import ContentionWorkload, contention_markdown, run_contention
from flair_fl.bench.data import TrainBench, run_train_bench, train_markdown
from flair_fl.bench.data_eval import MODELS, EvalWorkload, eval_markdown, run_eval_benchmark
from flair_fl.bench.run import command_line, machine

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options given on the command line (the others: each mode's own default)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def train_mode(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    shared = _given(args, "users", "repeats", "image_size", "input_size", "cache_dir")
    threads = TrainBench.threads if args.threads is None else args.threads
    bench = TrainBench(epochs=args.epochs, threads=threads, **shared)
    report = run_train_bench(bench, [torch.device(d) for d in args.devices])
    return report, train_markdown(report)


def eval_mode(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    shared = _given(args, "users", "repeats", "image_size", "input_size", "cache_dir", "threads")
    work = EvalWorkload(
        models=tuple(args.models), batch_size=args.batch_size, precision=args.precision, **shared
    )
    report = run_eval_benchmark(work, [torch.device(d) for d in args.devices])
    return report, eval_markdown(report)


def contention_mode(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    shared = _given(args, "image_size", "input_size", "cache_dir", "precision")
    work = ContentionWorkload(
        clients=args.clients,
        model=args.models[0],
        phase_s=args.phase_s,
        eval_users=args.users or ContentionWorkload.eval_users,
        **shared,
    )
    report = run_contention(work, torch.device(args.devices[-1]))
    return report, contention_markdown(report)


# Each mode: a function of the parsed arguments -> (its report, its markdown lines).
MODES: dict[str, Callable[[argparse.Namespace], tuple[dict[str, Any], list[str]]]] = {
    "train": train_mode,
    "eval": eval_mode,
    "contention": contention_mode,
}
ALL = ("train", "eval")  # --mode all


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--name", required=True, help="report name (benchmarks/results/NAME.*)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    default_devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=default_devices)
    # Shared by the modes; unset: each mode's default (train: TrainBench, eval: EvalWorkload).
    parser.add_argument("--users", type=int, help="synthetic users")
    parser.add_argument("--repeats", type=int, help="old/new pairs")
    parser.add_argument("--image-size", type=int, help="stored px (default 256)")
    parser.add_argument("--input-size", type=int, help="px into the model (default 224)")
    parser.add_argument("--cache-dir", help="where the synthetic set is cached")
    parser.add_argument("--epochs", type=int, default=TrainBench.epochs)
    parser.add_argument(
        "--threads", type=int, help="torch threads (train: 1, a client's; eval: torch's default)"
    )
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=list(EvalWorkload.models)
    )
    parser.add_argument("--batch-size", type=int, default=EvalWorkload.batch_size, help="eval")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=EvalWorkload.precision)
    parser.add_argument(
        "--clients", type=int, default=ContentionWorkload.clients, help="contention"
    )
    parser.add_argument(
        "--phase-s", type=float, default=ContentionWorkload.phase_s, help="contention"
    )
    args = parser.parse_args(argv)
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.exit(2, "bench_data.py: --devices cuda: no CUDA device here\n")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report: dict[str, Any] = {"command": command_line(), "machine": machine()}
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, GPU: {m['gpu'] or 'none'}"
        f"; torch {m['torch']}, Python {m['python']}; load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    for mode in ALL if args.mode == "all" else [args.mode]:
        report[mode], mode_lines = MODES[mode](args)
        lines += [*mode_lines, ""]
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{args.name}.json", args.out / f"{args.name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
