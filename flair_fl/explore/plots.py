"""Report figures, drawn on matplotlib's Agg canvas (no display, no global pyplot state)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from flair_fl.data.labels import COARSE_LABELS
from flair_fl.explore.samples import Sample
from flair_fl.explore.stats import ExploreStats

DPI = 100
TOP_FINE = 20  # fine labels shown in the frequency chart
CAPTION_LINES = 6  # per sample image; longer label lists are cut
Color = tuple[float, float, float, float]


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path


def coarse_colors(labels: Sequence[str]) -> dict[str, Color]:
    """One colour per coarse label, the same in every report (FLAIR's label index in tab20)."""
    cmap = colormaps["tab20"]
    extra = sorted(set(labels) - set(COARSE_LABELS))  # not FLAIR's vocabulary: next colours
    order = {label: i for i, label in enumerate([*COARSE_LABELS, *extra])}
    return {label: cmap(order[label] % cmap.N) for label in labels}


def _plain_log_ticks(axis: Axis) -> None:
    """Log-axis ticks as plain numbers (1, 10, 100) instead of powers of ten."""
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _log_bins(values: np.ndarray, count: int = 30) -> np.ndarray:
    """Integer-centred bin edges, evenly spaced on a log axis."""
    top = max(int(values.max()), 1)
    centres = np.unique(np.round(np.logspace(0, math.log10(top), count)))
    return np.append(centres - 0.5, top + 0.5)


def plot_images_per_user(stats: ExploreStats, path: Path) -> Path:
    """Log-log histogram of images per user, stacked by split."""
    figure = _figure(7, 3.6)
    ax = figure.add_subplot()
    counts, splits = stats.users.num_images, np.array(stats.users.splits)
    names = [s for s in stats.split_counts if s != "all"]
    ax.hist(
        [counts[splits == s] for s in names],
        bins=_log_bins(counts).tolist(),
        stacked=True,
        label=names,
    )
    summary = stats.images_per_user
    ax.axvline(summary.median, color="k", ls="--", lw=1, label=f"median {summary.median:g}")
    ax.axvline(summary.mean, color="k", ls=":", lw=1, label=f"mean {summary.mean:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="images per user", ylabel="users")
    _plain_log_ticks(ax.xaxis)
    _plain_log_ticks(ax.yaxis)
    ax.set_title(f"Images per user ({len(counts):,} users, {stats.num_images:,} images)")
    ax.legend(fontsize=8)
    return _save(figure, path)


def _bars(ax: Axes, histogram: dict[int, int], title: str, xlabel: str) -> None:
    ax.bar(list(histogram), list(histogram.values()), color="tab:blue")
    ax.set(title=title, xlabel=xlabel, ylabel="images")


def plot_labels_per_image(stats: ExploreStats, path: Path) -> Path:
    """Bar charts: how many coarse / fine labels an image carries."""
    figure = _figure(9, 3.2)
    left, right = figure.subplots(1, 2)
    _bars(left, stats.coarse_per_image_hist, "Coarse labels per image", "coarse labels")
    _bars(right, stats.fine_per_image_hist, "Fine labels per image", "fine labels")
    return _save(figure, path)


def plot_label_frequency(stats: ExploreStats, path: Path) -> Path:
    """Share of images carrying each coarse label, and the top fine labels."""
    colors = coarse_colors(stats.coarse_labels)
    figure = _figure(10, 4.8)
    left, right = figure.subplots(1, 2)
    total = stats.num_images
    coarse = list(stats.coarse_frequency)[::-1]
    shares = [100 * stats.coarse_frequency[c] / total for c in coarse]
    left.barh(coarse, shares, color=[colors[c] for c in coarse])
    left.set(title="Coarse labels", xlabel="% of images")
    fine = list(stats.fine_frequency)[:TOP_FINE][::-1]
    parent = stats.hierarchy.parent
    grey: Color = (0.6, 0.6, 0.6, 1.0)
    right.barh(
        fine,
        [100 * stats.fine_frequency[f] / total for f in fine],
        color=[colors.get(parent.get(f, ""), grey) for f in fine],
    )
    right.set(title=f"Top {len(fine)} fine labels (coloured by coarse label)", xlabel="% of images")
    for ax in (left, right):
        ax.tick_params(axis="y", labelsize=8)
    return _save(figure, path)


def plot_labels_per_user(stats: ExploreStats, path: Path) -> Path:
    """Histograms of the distinct coarse and fine labels each user has."""
    figure = _figure(9, 3.2)
    left, right = figure.subplots(1, 2)
    coarse = stats.users.distinct_coarse
    left.hist(coarse, bins=np.arange(0.5, len(stats.coarse_labels) + 1.5), color="tab:green")
    left.set(title="Distinct coarse labels per user", xlabel="coarse labels", ylabel="users")
    fine = stats.users.distinct_fine
    right.hist(fine, bins=_log_bins(fine).tolist(), color="tab:green")
    right.set(
        title="Distinct fine labels per user",
        xlabel="fine labels",
        ylabel="users",
        xscale="log",
        yscale="log",
    )
    _plain_log_ticks(right.xaxis)
    _plain_log_ticks(right.yaxis)
    return _save(figure, path)


def plot_hierarchy(stats: ExploreStats, path: Path) -> Path:
    """Fine labels per coarse label."""
    colors = coarse_colors(stats.coarse_labels)
    figure = _figure(6, 4.2)
    ax = figure.add_subplot()
    labels = list(stats.hierarchy.fine_per_coarse)[::-1]
    ax.barh(
        labels,
        [stats.hierarchy.fine_per_coarse[c] for c in labels],
        color=[colors[c] for c in labels],
    )
    unplaced = len(stats.hierarchy.unplaced)
    note = f"; {unplaced} unplaced" if unplaced else ""
    ax.set(
        title=f"Fine labels per coarse label\n({stats.hierarchy.source}{note})",
        xlabel="fine labels present",
    )
    ax.tick_params(axis="y", labelsize=8)
    return _save(figure, path)


def plot_non_iid(stats: ExploreStats, path: Path) -> Path:
    """Per-user share of images carrying each coarse label, against the global share."""
    figure = _figure(10, 4.2)
    ax = figure.add_subplot()
    non_iid, users = stats.non_iid, stats.users
    keep = users.num_images >= non_iid.min_images
    shares = users.coarse_counts[keep] / users.num_images[keep, None]
    positions = np.arange(len(stats.coarse_labels))
    if shares.shape[0]:
        ax.boxplot(list(shares.T), positions=positions, widths=0.6, flierprops={"markersize": 2})
    global_share = [non_iid.global_share[c] for c in stats.coarse_labels]
    ax.scatter(positions, global_share, color="tab:red", zorder=3, label="all images")
    ax.set_xticks(positions, stats.coarse_labels, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="share of the user's images", ylim=(-0.02, 1.02))
    ax.set_title(
        f"Label mix per user ({non_iid.users:,} users with >= {non_iid.min_images} "
        f"images; mean TV distance to global {non_iid.mean_tv_distance:.3f})"
    )
    ax.legend(fontsize=8, loc="upper left")
    return _save(figure, path)


def _caption(sample: Sample, width: int = 34) -> str:
    coarse = ", ".join(sorted(sample.labels.coarse))
    fine = ", ".join(sorted(sample.labels.fine))
    lines = [sample.user_id, *textwrap.wrap(coarse, width), *textwrap.wrap(f"[{fine}]", width)]
    if len(lines) > CAPTION_LINES:
        lines = [*lines[: CAPTION_LINES - 1], lines[CAPTION_LINES - 1] + " …"]
    return "\n".join(lines)


def plot_samples(samples: list[Sample], path: Path, columns: int = 4) -> Path:
    """A grid of images captioned with user id, coarse labels and [fine labels]."""
    rows = max(1, math.ceil(len(samples) / columns))
    figure = Figure(figsize=(2.4 * columns, 3.2 * rows), dpi=DPI)  # fixed layout: fast
    FigureCanvasAgg(figure)
    figure.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.01,
        top=1 - 0.8 / (3.2 * rows),
        wspace=0.08,
        hspace=0.8 / 2.4,
    )
    for i, axis in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axis.axis("off")
        if i < len(samples):
            axis.imshow(samples[i].image, interpolation="nearest")
            axis.set_title(_caption(samples[i]), fontsize=7)
    return _save(figure, path)
