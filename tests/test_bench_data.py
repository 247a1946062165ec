"""scripts/bench_data.py's training mode on a tiny workload: both paths, both stores, ratios."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flair_fl.bench.data import TrainBench, run_train_bench, train_markdown


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
        old, new = results[f"cpu/{store}/old"], results[f"cpu/{store}/new"]
        assert old["trained_images"] == new["trained_images"] > 0
        assert len(new["cpu_ms_per_image_each_repeat"]) == 1
        assert new["cpu_ratio_to_old"] == new["cpu_ms_per_image"] / old["cpu_ms_per_image"]
    assert len(report["load_average_before"]) == 3
    assert any("| cpu / jpeg | new |" in line for line in train_markdown(report))
    json.dumps(report)  # the script writes it as JSON
