"""One exploration: scan the labels, draw samples, print, plot and write the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flair_fl.explore import plots
from flair_fl.explore.report import format_summary, write_json, write_report
from flair_fl.explore.samples import draw_samples
from flair_fl.explore.sources import open_source
from flair_fl.explore.stats import ALL_SPLITS, ExploreStats, compute_stats

NUM_SAMPLES = 16
STAT_FIGURES = {
    "images_per_user": plots.plot_images_per_user,
    "labels_per_image": plots.plot_labels_per_image,
    "label_frequency": plots.plot_label_frequency,
    "labels_per_user": plots.plot_labels_per_user,
    "hierarchy": plots.plot_hierarchy,
    "non_iid": plots.plot_non_iid,
}


@dataclass(frozen=True)
class ExploreResult:
    """The statistics and the files written."""

    stats: ExploreStats
    summary: str
    report: Path
    stats_json: Path
    figures: dict[str, Path]


def explore(
    data: str | Path,
    out: str | Path,
    split: str = ALL_SPLITS,
    user: str | None = None,
    seed: int = 0,
    relationship: str | Path | None = None,
    progress: bool = True,
) -> ExploreResult:
    """Explore a raw FLAIR directory or a prepared HDF5 and write the report into `out`."""
    source = open_source(data, relationship)
    stats = compute_stats(source, split, progress=progress)
    samples = draw_samples(source, stats.users, NUM_SAMPLES, seed, user)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {name: draw(stats, out / f"{name}.png") for name, draw in STAT_FIGURES.items()}
    figures["samples"] = plots.plot_samples(samples, out / "samples.png")
    return ExploreResult(
        stats=stats,
        summary=format_summary(stats),
        report=write_report(stats, figures, out / "report.md"),
        stats_json=write_json(stats, out / "stats.json"),
        figures=figures,
    )
