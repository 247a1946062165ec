"""Run the benchmark side by side: flair-fl (per transport) and the pure-PyTorch reference."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from flair_fl.bench.reference import run_reference
from flair_fl.bench.workload import Workload
from flair_fl.services.memory import reset_peak_rss

# Per-round keys of a flair-fl run (federated/round.run_rounds) and what the report calls them.
BREAKDOWN = {
    "time_sample_s": "sampling",
    "time_send_s": "transport out (driver)",
    "client_load_s": "transport out (clients, summed)",
    "client_compute_s": "client compute (summed)",
    "client_reply_s": "transport back (clients, summed)",
    "time_wait_s": "driver waiting for clients",
    "time_aggregate_s": "aggregation (driver)",
}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import flwr
    import ray

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(pages * page_size / 2**30, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "ray": ray.__version__,
    }


def _median(rows: list[dict[str, Any]], key: str, warmup: int) -> float:
    values = [float(r[key]) for r in rows[warmup:] if key in r]
    return statistics.median(values) if values else float("nan")


def run_flair(workload: Workload, transport: str, out: Path) -> dict[str, Any]:
    """One flair-fl run of the workload; per-round rows and a summary."""
    from flair_fl.modes.federated import run_experiment

    reset_peak_rss()  # the driver's peak is this run's, not an earlier one's in this process
    started = time.perf_counter()
    summary = run_experiment(workload.config(transport), out)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "rows": rows,
        "wall_s": wall,
        "startup_s": wall - sum(float(r["round_time_s"]) for r in rows),
        "final_val_macro_ap": summary.get("final_val_macro_ap"),
    }


def summarize(workload: Workload, result: dict[str, Any]) -> dict[str, Any]:
    """Medians over the rounds after the warm-up."""
    rows, warmup = result["rows"], workload.warmup
    round_s = _median(rows, "round_time_s", warmup)
    images = _median(rows, "train_images", warmup)
    out = {
        "round_s": round_s,
        "images_per_round": images,
        "images_per_s": images * workload.epochs / round_s if round_s else float("nan"),
        "breakdown_s": {name: _median(rows, key, warmup) for key, name in BREAKDOWN.items()},
        "driver_peak_rss_mb": max((float(r.get("driver_rss_mb", 0)) for r in rows), default=0),
        "client_peak_rss_mb": max((float(r.get("client_rss_mb", 0)) for r in rows), default=0),
        "peak_gpu_mem_mb": max((float(r.get("client_gpu_mem_mb", 0)) for r in rows), default=0),
    }
    for key in ("wall_s", "startup_s", "final_val_macro_ap"):
        if key in result:
            out[key] = result[key]
    return out


def reference_in_own_process(cfg: DictConfig, workdir: Path, threads: int) -> list[dict[str, Any]]:
    """The reference in a fresh process: its peak RSS and torch threads are its own."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(run_reference, cfg, workdir, threads).result()


def run_benchmark(
    workload: Workload, transports: list[str], out: Path, command: str
) -> dict[str, Any]:
    """flair-fl per transport (in this process), then the reference per thread count."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "workload": asdict(workload),
        "flair_fl": {},
    }
    for transport in transports:
        result = run_flair(workload, transport, out / f"flair-{transport}")
        report["flair_fl"][transport] = summarize(workload, result)
    cfg = workload.config(transports[0])
    report["references"] = {}
    for threads in workload.thread_counts():
        rows = reference_in_own_process(cfg, out / f"reference-{threads}", threads)
        reference = summarize(workload, {"rows": rows})
        reference["driver_peak_rss_mb"] = rows[-1]["peak_rss_mb"]
        reference["peak_gpu_mem_mb"] = rows[-1]["gpu_mem_mb"]
        reference["breakdown_s"] = {}
        reference["threads"] = rows[-1]["threads"]
        reference["pid"] = rows[-1]["pid"]
        report["references"][str(threads)] = reference
    # The lower bound: the fastest of the reference's thread counts.
    report["reference"] = min(report["references"].values(), key=lambda r: r["round_s"])
    return with_ratios(report)


def with_ratios(report: dict[str, Any]) -> dict[str, Any]:
    """Ratios of the flair-fl runs to the reference (the fastest thread count)."""
    reference = report["reference"]
    report["ratio_to_reference"] = {
        t: s["round_s"] / reference["round_s"] for t, s in report["flair_fl"].items()
    }
    report["same_images_per_round"] = {
        t: s["images_per_round"] == reference["images_per_round"]
        for t, s in report["flair_fl"].items()
    }
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table (with machine and command)."""
    m, w = report["machine"], report["workload"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, GPU: {m['gpu'] or 'none'}"
        f"; torch {m['torch']}, flwr {m['flwr']}, ray {m['ray']}, Python {m['python']}",
        "",
        f"Workload: {w['model']}, {w['image_size']} px, cohort {w['cohort']}, {w['epochs']} "
        f"local epochs, batch {w['batch_size']}, {w['users']} synthetic users (FLAIR's per-user "
        f"sizes, at most {w['max_images']} images), {w['rounds']} rounds (medians after "
        f"{w['warmup']} warm-up), device {w['device']}, per client {w['num_cpus']} CPU / "
        f"{w['num_gpus']} GPU, {w['precision']}; reference: 1 process (ratios against its "
        f"fastest thread count)",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    columns = [
        (f"reference (1 process, {r['threads']} thread{'s' * (r['threads'] > 1)})", r)
        for r in report["references"].values()
    ]
    columns += [(f"flair-fl, transport={t}", s) for t, s in report["flair_fl"].items()]
    header = "| | " + " | ".join(name for name, _ in columns) + " |"
    lines += [header, "|---" * (len(columns) + 1) + "|"]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("round wall time (s, median)", [f"{s['round_s']:.3f}" for _, s in columns])
    best = report["reference"]["round_s"]
    ratios = [f"{r['round_s'] / best:.2f}" for _, r in columns[: len(report["references"])]]
    ratios += [f"{report['ratio_to_reference'][t]:.2f}" for t in report["flair_fl"]]
    row("ratio to reference", ratios)
    row("train images/s", [f"{s['images_per_s']:.0f}" for _, s in columns])
    for name in BREAKDOWN.values():
        row(f"- {name} (s)", [_fmt(s["breakdown_s"].get(name)) for _, s in columns])
    row("driver peak RSS (MB)", [f"{s['driver_peak_rss_mb']:.0f}" for _, s in columns])
    flair = [f"{s['client_peak_rss_mb']:.0f}" for s in report["flair_fl"].values()]
    row("client peak RSS (MB)", ["-"] * len(report["references"]) + flair)
    row("peak GPU memory (MB)", [f"{s['peak_gpu_mem_mb']:.0f}" for _, s in columns])
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_report(report: dict[str, Any], out: Path, name: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def command_line() -> str:
    return " ".join(["python", *sys.argv])
