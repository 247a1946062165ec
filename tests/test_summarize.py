"""Sweep summaries on a hand-built multirun dir: means and sample stds worked out by hand."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flair_fl.artifacts.summarize import CSV_NAME, MARKDOWN_NAME, find_jobs, format_text, summarize

REPO = Path(__file__).resolve().parents[1]
# (strategy, seed, best val macro AP, final test macro AP); None: the job failed
JOBS = [
    ("fedavg", 0, 0.10, 0.30),
    ("fedavg", 1, 0.20, 0.30),
    ("fedavg", 2, 0.30, 0.30),
    ("fedprox", 0, 0.40, 0.20),
    ("fedprox", 1, 0.60, 0.40),
    ("fedprox", 2, None, None),
]


def _make_sweep(root: Path) -> Path:
    """A multirun dir as Hydra writes it: <num>_<overrides>/{.hydra/overrides.yaml, ...}."""
    for num, (strategy, seed, val_ap, test_ap) in enumerate(JOBS):
        job = root / f"{num}_seed={seed},strategy={strategy}"
        (job / ".hydra").mkdir(parents=True)
        overrides = ["debug=tiny", f"strategy={strategy}", f"seed={seed}"]
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if val_ap is None:
            (job / "error.txt").write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
        else:
            summary = {"best_val_macro_ap": val_ap, "final_test_macro_ap": test_ap, "rounds": 2}
            (job / "summary.json").write_text(json.dumps(summary))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _summarize_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/summarize.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_means_and_sample_stds_per_setting(tmp_path: Path) -> None:
    jobs = find_jobs(_make_sweep(tmp_path))

    table = summarize(jobs, ["best_val_macro_ap", "final_test_macro_ap", "not_reported"])

    assert table.keys == ["strategy"] and table.common == ["debug=tiny"]
    assert table.metrics == ["best_val_macro_ap", "final_test_macro_ap"]
    fedavg, fedprox = table.rows
    assert fedavg.setting == {"strategy": "fedavg"} and (fedavg.done, fedavg.failed) == (3, 0)
    mean, std = fedavg.mean_std("best_val_macro_ap")
    assert mean == pytest.approx(0.2) and std == pytest.approx(0.1)  # ddof=0 would be 0.0816
    assert fedavg.mean_std("final_test_macro_ap") == pytest.approx((0.3, 0.0))
    assert (fedprox.done, fedprox.failed) == (2, 1)
    mean, std = fedprox.mean_std("best_val_macro_ap")
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.02**0.5)
    assert [job.error for job in table.failures] == ["RuntimeError: CUDA out of memory"]


def test_a_single_value_has_no_std_and_other_keys_can_be_averaged_over(tmp_path: Path) -> None:
    jobs = find_jobs(_make_sweep(tmp_path))

    table = summarize(jobs, ["best_val_macro_ap"], over=["seed", "strategy"])

    assert table.keys == [] and len(table.rows) == 1
    assert table.rows[0].mean_std("best_val_macro_ap") == pytest.approx((0.32, 0.19235384))
    single = summarize(jobs[:1], ["best_val_macro_ap"])
    assert single.rows[0].mean_std("best_val_macro_ap") == (0.1, None)
    assert "0.1000 ± " not in format_text(single) and "0.1000" in format_text(single)


def test_script_prints_the_table_and_writes_csv_and_markdown(tmp_path: Path) -> None:
    sweep, out = _make_sweep(tmp_path / "sweep"), tmp_path / "out"

    done = _summarize_cli(sweep, "--out", out, "--metric", "best_val_macro_ap")

    assert done.returncode == 0, done.stderr
    assert "0.2000 ± 0.1000" in done.stdout and "0.5000 ± 0.1414" in done.stdout
    assert "sample std (ddof=1)" in done.stdout
    assert "5_seed=2,strategy=fedprox: RuntimeError: CUDA out of memory" in done.stdout
    with (out / CSV_NAME).open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["strategy"], r["n"], r["failed"]) for r in rows] == [
        ("fedavg", "3", "0"),
        ("fedprox", "2", "1"),
    ]
    assert float(rows[0]["best_val_macro_ap_mean"]) == pytest.approx(0.2)
    assert float(rows[0]["best_val_macro_ap_std"]) == pytest.approx(0.1)
    markdown = (out / MARKDOWN_NAME).read_text()
    assert "| strategy | n | failed | best_val_macro_ap |" in markdown
    assert "| fedavg | 3 | 0 | 0.2000 ± 0.1000 |" in markdown


def test_script_refuses_a_dir_without_jobs(tmp_path: Path) -> None:
    done = _summarize_cli(tmp_path)

    assert done.returncode == 2 and "no Hydra jobs" in done.stderr
