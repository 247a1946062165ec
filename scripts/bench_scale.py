"""Population scale: driver memory and start-up at ~1k vs FLAIR's 41k train users.

python scripts/bench_scale.py --name cpu-scale

For each population it generates a synthetic FLAIR set (FLAIR's per-user size distribution,
tiny images, at most `--images-per-user` each, cached), measures the population index's
start-up time and the cohort sampler's cost per round, and runs flair-fl in a fresh process
(same model, cohort and rounds) to read the driver's peak RSS. Writes
benchmarks/results/<name>.json and .md. Goal: RSS at 41k users within 2x of 1k.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flair_fl.bench.run import machine
from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.prepare import prepare_flair
from flair_fl.data.synthetic import SyntheticSpec, generate_synthetic_flair, is_complete
from flair_fl.federated.sampling import CohortSampler

ROOT = Path(__file__).resolve().parents[1]
# Total users such that ~80% (the train split) is ~1k and FLAIR's 41,131.
POPULATIONS = {"1k": 1_280, "41k": 51_414}


def dataset(
    total_users: int, image_size: int, per_user: int, cache: Path
) -> tuple[Path, float | None]:
    """The prepared HDF5 of a synthetic population (built once); seconds it took to build
    (None: it was already in the cache)."""
    spec = SyntheticSpec(
        num_users=total_users, image_size=image_size, max_images_per_user=per_user, seed=0
    )
    root = cache / f"scale-{spec.key()}"
    hdf5 = root / "flair.hdf5"
    started = time.perf_counter()
    if hdf5.is_file() and is_complete(root / "raw", spec):
        return hdf5, None
    generate_synthetic_flair(root / "raw", spec)
    prepare_flair(root / "raw", hdf5, progress=False, workers=2)
    return hdf5, time.perf_counter() - started


def startup(hdf5: Path, cohort: int) -> dict[str, float]:
    """Population index start-up (a fresh reader) and sampling cost per round."""
    started = time.perf_counter()
    users = list(FlairHDF5(hdf5).population("train"))
    index_s = time.perf_counter() - started
    sampler = CohortSampler(users, cohort, seed=0)
    times = []
    for r in range(1, 2001):
        t = time.perf_counter()
        sampler.sample(r)
        times.append(time.perf_counter() - t)
    return {
        "train_users": len(users),
        "population_index_s": index_s,
        "sample_ms_median": statistics.median(times) * 1e3,
    }


def run_flair(hdf5: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """flair-fl in its own process: peak RSS of the driver over the rounds."""
    command = [
        sys.executable,
        "-m",
        "flair_fl.run",
        "data=flair",
        f"data.path={hdf5}",
        f"data.input_size={args.image_size}",
        f"model={args.model}",
        f"cohort_size={args.cohort}",
        f"num_rounds={args.rounds}",
        "client.epochs=1",
        "eval_every=0",
        "eval.test_at_end=false",
        "checkpoint_every=0",
        f"hydra.run.dir={out}",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "driver_peak_rss_mb": max(r["driver_rss_mb"] for r in rows),
        "sample_s_median": statistics.median(r["time_sample_s"] for r in rows),
        "run_wall_s": time.perf_counter() - started,
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; torch {m['torch']}, "
        f"flwr {m['flwr']}, ray {m['ray']}",
        "",
        f"Command: `{report['command']}`",
        "",
        "| population | train users | index start-up (s) | sampling per round (ms) "
        "| driver peak RSS (MB) | data build (s, once) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["populations"].items():
        lines.append(
            f"| {name} | {r['train_users']} | {r['population_index_s']:.2f} | "
            f"{r['sample_ms_median']:.3f} | {r['driver_peak_rss_mb']:.0f} | "
            + ("cached" if r["build_s"] is None else f"{r['build_s']:.0f}")
            + " |"
        )
    lines += ["", f"Driver RSS ratio 41k / 1k: {report['rss_ratio']:.2f} (goal <= 2)"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "flair_fl")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--images-per-user", type=int, default=4)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--cohort", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "populations": {},
    }
    for name, total in POPULATIONS.items():
        hdf5, build_s = dataset(total, args.image_size, args.images_per_user, args.cache)
        result = {"build_s": build_s, **startup(hdf5, 200)}
        result.update(run_flair(hdf5, args, args.cache / f"scale-run-{name}"))
        report["populations"][name] = result
        print(name, result, flush=True)
    pops = report["populations"]
    report["rss_ratio"] = pops["41k"]["driver_peak_rss_mb"] / pops["1k"]["driver_peak_rss_mb"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
