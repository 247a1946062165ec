"""scripts/bench_data.py on tiny workloads: train and eval modes, both paths, both stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flair_fl.bench.contention import phase_rates
from flair_fl.bench.data import TrainBench, run_train_bench, train_markdown
from scripts.bench_data import main


def test_train_bench_times_old_and_new_on_the_same_images(tmp_path: Path) -> None:
    # Prepare
    bench = TrainBench(
        users=6, image_size=32, input_size=24, repeats=1, epochs=1, cache_dir=str(tmp_path)
    )

    # Execute
    report = run_train_bench(bench, [torch.device("cpu")])

    # Assert: each path trained the same images; CPU times and the ratios are there
    results = report["results"]
    for store in ("uint8", "jpeg", "augment only"):
        old = results[f"cpu/{store}/old"]
        for path in ("new", "new-nhwc"):
            new = results[f"cpu/{store}/{path}"]
            assert old["trained_images"] == new["trained_images"] > 0
            assert len(new["cpu_ms_per_image_each_repeat"]) == 1
            assert new["cpu_ratio_to_old"] == new["cpu_ms_per_image"] / old["cpu_ms_per_image"]
    assert len(report["load_average_before"]) == 3
    assert any("| cpu / jpeg | new |" in line for line in train_markdown(report))
    # ... and where the new path's CPU went, stage by stage, for each store
    assert any(
        "| read | to device | batch indices | augment |" in line for line in train_markdown(report)
    )
    for store in ("uint8", "jpeg"):
        stages = report["new_path_cpu_ms_per_image_by_stage"][f"cpu/{store}"]
        assert set(stages) == {"read", "to device", "batch indices", "augment"}
        assert all(ms >= 0 for ms in stages.values()) and stages["augment"] > 0
        rows = [line for line in train_markdown(report) if line.startswith(f"| cpu / {store} |")]
        assert len(rows) == 4  # old, new, new-nhwc, and the stage row
    json.dumps(report)  # the script writes it as JSON


def test_eval_mode_writes_paired_results_for_both_stores(tmp_path: Path) -> None:
    # Prepare: a tiny synthetic set, through the one bench_data CLI
    args = ["--mode", "eval", "--name", "tiny", "--out", str(tmp_path), "--repeats", "2"]
    args += ["--users", "12", "--image-size", "16", "--input-size", "12", "--devices", "cpu"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--batch-size", "4"]

    # Execute
    assert main(args) == 0

    # Assert: paired timings per store and model (the near-free one and smallcnn), both
    # paths give the same metrics
    report = json.loads((tmp_path / "tiny.json").read_text())["eval"]
    expected = {f"cpu/{s}/{m}" for s in ("uint8", "jpeg") for m in ("meanpool", "smallcnn")}
    assert set(report["results"]) == expected
    for result in report["results"].values():
        assert len(result["per_image_s"]) == len(result["in_memory_s"]) == 2
        assert result["images"] > 0 and result["max_metric_difference"] <= 1e-4
        first = result["in_memory_load_once_s"] + result["in_memory_s"][0]
        assert result["ratio_first_evaluation"] >= first / max(result["per_image_s"]) > 0
    assert "Load average" in (tmp_path / "tiny.md").read_text()


def test_phase_rates_share_each_training_between_the_phases_it_spans() -> None:
    # Prepare: phases [0, 2), [2, 3), [3, 5); client A trains 10 images in [0, 1], 12 in
    # [1, 2.5] (1 s of its 1.5 before the edge at 2), 7 in [2.5, 6] (past the last edge);
    # client B 4 images in [2, 3]
    trainings = [[(0.0, 1.0, 10), (1.0, 2.5, 12), (2.5, 6.0, 7)], [(2.0, 3.0, 4)]]

    # Execute
    rates = phase_rates(trainings, [0.0, 2.0, 3.0, 5.0])

    # Assert: by hand
    alone = (10 + 12 * 1 / 1.5) / 2
    beside = (12 * 0.5 / 1.5 + 7 * 0.5 / 3.5 + 4) / 1
    again = (7 * 2 / 3.5) / 2
    expected = {"alone": alone, "beside evaluation": beside, "alone again": again}
    assert rates == pytest.approx(expected, rel=1e-12)


def test_contention_mode_measures_clients_in_every_phase(tmp_path: Path) -> None:
    # Prepare: one real client process (spawned) beside the driver's evaluation, tiny
    args = [
        *("--mode", "contention", "--name", "contention", "--out", str(tmp_path)),
        *("--devices", "cpu", "--users", "12", "--image-size", "32", "--input-size", "24"),
        *("--clients", "1", "--phase-s", "1.5", "--models", "smallcnn", "--cache-dir"),
        str(tmp_path / "data"),
    ]

    # Execute
    assert main(args) == 0

    # Assert: the client trained in each phase; the evaluation ran alone and beside it
    report = json.loads((tmp_path / "contention.json").read_text())["contention"]
    rates = report["clients_images_per_s"]
    assert set(rates) == {"alone", "beside evaluation", "alone again"}
    assert all(rate > 0 for rate in rates.values())
    alone = (rates["alone"] + rates["alone again"]) / 2
    assert report["clients_ratio_beside_evaluation"] == rates["beside evaluation"] / alone
    assert report["eval_images_per_s_alone"] > 0 and report["eval_images_per_s_beside_clients"] > 0
    assert "ratio beside / alone" in (tmp_path / "contention.md").read_text()
