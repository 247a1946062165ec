"""The benchmark's smoke setting: both transports and the reference, side by side (no timing
assertions: speed goals live in benchmarks/results, measured with scripts/bench.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flair_fl.bench.run import markdown, run_benchmark, write_report
from flair_fl.bench.workload import Workload
from tests.conftest import CACHE_DIR


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_smoke_benchmark_reports_both_paths_on_the_same_work(
    run_overrides: list[str], tmp_path: Path
) -> None:
    workload = Workload(
        cohort=3,
        rounds=2,
        warmup=1,
        users=40,
        image_size=16,
        epochs=1,
        cache_dir=str(CACHE_DIR),
        supernodes=2,
        reference_threads=(1, 2),
        extra_overrides=tuple(o for o in run_overrides if "simulation.backend" in o),
    )
    report = run_benchmark(workload, ["shared", "message"], tmp_path / "work", "pytest")
    assert set(report["flair_fl"]) == {"shared", "message"}
    reference = report["reference"]
    # The lower bound is the fastest thread count, each measured in a process of its own
    # (so neither the flair-fl driver's memory nor its torch threads leak into it).
    assert set(report["references"]) == {"1", "2"}
    fastest = min(r["round_s"] for r in report["references"].values())
    assert reference["round_s"] == fastest
    for threads, r in report["references"].items():
        assert r["images_per_round"] == reference["images_per_round"]
        assert r["threads"] == int(threads) and r["pid"] != os.getpid()
        assert r["driver_peak_rss_mb"] > 0
    assert len({r["pid"] for r in report["references"].values()}) == 2
    for transport, result in report["flair_fl"].items():
        # Same users, same images: the reference did exactly the clients' work.
        assert result["images_per_round"] == reference["images_per_round"] > 0, transport
        assert report["same_images_per_round"][transport]
        assert result["round_s"] > 0 and result["client_peak_rss_mb"] > 0
        assert result["breakdown_s"]["client compute (summed)"] > 0
        assert report["ratio_to_reference"][transport] == result["round_s"] / fastest
    json_path, md_path = write_report(report, tmp_path / "results", "smoke")
    table = md_path.read_text()
    assert "ratio to reference" in table and "transport=shared" in table
    assert "1 process, 1 thread)" in table and "1 process, 2 threads)" in table
    assert json_path.is_file() and markdown(report) == table
    assert report["machine"]["cores"] and report["machine"]["torch"]


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_thread_scaling_probe_reports_three_timings() -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_threads.py"
    done = subprocess.run(
        [sys.executable, str(script), "--steps", "2", "--image-size", "16", "--batch-size", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    timings = [float(t) for t in re.findall(r"\d+\.\d+", done.stdout)]
    assert len(timings) == 4 and all(t > 0 for t in timings), done.stdout
