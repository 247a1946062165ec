"""Benchmark flair-fl against a single-process pure-PyTorch reference (same client work).

python scripts/bench.py --name cpu-smallcnn --model smallcnn --image-size 32 --cohort 16
python scripts/bench.py --name h100-flair --device cuda --model resnet18 --image-size 224 \
    --cohort 200 --epochs 2 --batch-size 16 --num-cpus 2 --num-gpus 0.125 --users 2000

Writes benchmarks/results/<name>.json and .md (per-round medians after warm-up, images/s,
ratio to the reference, time breakdown, peak memory, machine and command).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from flair_fl.bench.run import command_line, markdown, run_benchmark, write_report
from flair_fl.bench.workload import Workload

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="report name (benchmarks/results/NAME.*)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument(
        "--transport", choices=["shared", "message", "both"], default="both", help="flair-fl path"
    )
    for f in fields(Workload):
        if f.name == "extra_overrides":
            parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
            continue
        flag = "--" + f.name.replace("_", "-")
        if str(f.type).startswith("tuple[int"):
            parser.add_argument(flag, type=int, nargs="+", default=f.default)
        elif f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            if str(f.type).startswith("int |"):
                kind = int
            parser.add_argument(flag, type=kind, default=f.default)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    values = {
        f.name: getattr(args, f.name) for f in fields(Workload) if f.name != "extra_overrides"
    }
    values["reference_threads"] = tuple(values["reference_threads"])
    workload = Workload(**values, extra_overrides=tuple(args.overrides))
    transports = ["shared", "message"] if args.transport == "both" else [args.transport]
    with tempfile.TemporaryDirectory(prefix="flair-bench-") as work:
        report = run_benchmark(workload, transports, Path(work), command_line())
    json_path, md_path = write_report(report, args.out, args.name)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
