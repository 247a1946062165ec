"""PNG plots of a run: valid images with the curves drawn, from the metrics of each round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from flair_fl.loggers.plots import PlotLogger, write_plots

# matplotlib's first two default line colours (C0, C1): the first and second curve
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _count(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(np.abs(pixels.astype(int) - colour) <= 2, axis=-1).sum())


def test_plots_are_pngs_with_one_curve_per_metric(tmp_path: Path) -> None:
    rows = {
        r: {"train_loss": 1.0 / r, "val_loss": 0.8 / r, "val_macro_ap": 0.1 * r}
        for r in range(1, 6)
    }
    for r in rows:
        rows[r]["val_micro_ap"] = 0.05 * r

    written = write_plots(rows, tmp_path)

    assert written == [tmp_path / "val_ap.png", tmp_path / "loss.png"]
    for path in written:
        pixels = _pixels(path)
        assert pixels.shape == (400, 640, 3)
        assert _count(pixels, BLUE) > 200 and _count(pixels, ORANGE) > 200  # both curves drawn


def test_missing_and_non_finite_values_are_left_out(tmp_path: Path) -> None:
    rows = {1: {"train_loss": 0.9}, 2: {"train_loss": float("nan")}, 3: {"train_loss": None}}

    written = write_plots(rows, tmp_path)

    assert written == [tmp_path / "loss.png"]  # no val metrics: no val AP plot
    pixels = _pixels(tmp_path / "loss.png")
    assert _count(pixels, BLUE) > 50 and _count(pixels, ORANGE) == 0  # no val loss curve


def test_plot_logger_writes_at_summary_with_the_untrained_model_as_round_0(
    tmp_path: Path,
) -> None:
    logger = PlotLogger(tmp_path)
    logger.log_round(1, {"train_loss": 0.7, "val_macro_ap": 0.3, "val_micro_ap": 0.2})
    logger.log_round(2, {"train_loss": 0.5, "val_macro_ap": 0.4, "val_micro_ap": 0.3})
    assert not (tmp_path / "val_ap.png").exists()  # nothing drawn per round

    logger.log_summary({"untrained_val_macro_ap": 0.1, "untrained_val_micro_ap": 0.05})
    logger.close()

    assert sorted(logger.rows) == [0, 1, 2]
    assert logger.rows[0] == {"val_macro_ap": 0.1, "val_micro_ap": 0.05}
    assert _count(_pixels(tmp_path / "val_ap.png"), BLUE) > 100


def test_a_failed_job_gets_its_plots_on_close(tmp_path: Path) -> None:
    logger = PlotLogger(tmp_path)
    logger.log_round(1, {"train_loss": 0.7})

    logger.close()  # no summary: the job died

    assert (tmp_path / "loss.png").is_file()


def test_a_resumed_run_plots_the_rounds_before_and_after_its_checkpoint(tmp_path: Path) -> None:
    lines = [json.dumps({"round": r, "train_loss": 1.0 / r}) for r in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    logger = PlotLogger(tmp_path)

    logger.resume_from(2)  # checkpoint after round 2; round 3 is recomputed
    logger.log_round(3, {"train_loss": 0.25})

    assert {r: row["train_loss"] for r, row in logger.rows.items()} == {1: 1.0, 2: 0.5, 3: 0.25}
