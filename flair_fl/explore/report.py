"""The printed summary, `stats.json` and the markdown page `report.md` showing the figures."""

from __future__ import annotations

import json
from dataclasses import astuple
from pathlib import Path

from flair_fl.explore.stats import ExploreStats, Summary

SUMMARY_COLUMNS = ("min", "q25", "median", "q75", "mean", "std", "max")
TOP_FINE_PRINTED = 20
FIGURE_CAPTIONS = {
    "images_per_user": "Images per user (log-log, stacked by split)",
    "labels_per_image": "Labels per image",
    "label_frequency": "Label frequencies",
    "labels_per_user": "Distinct labels per user",
    "hierarchy": "Fine labels per coarse label",
    "non_iid": "Non-IID-ness: each user's label mix against the global one",
    "samples": "Sample images: user id, coarse labels, fine labels in brackets",
}


def number(value: float) -> str:
    """Integers as integers, everything else with three decimals."""
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def summary_rows(stats: ExploreStats) -> list[tuple[str, Summary]]:
    """The distribution summaries, by printed name."""
    return [
        ("images per user", stats.images_per_user),
        ("coarse labels per image", stats.coarse_per_image),
        ("fine labels per image", stats.fine_per_image),
        ("distinct coarse per user", stats.distinct_coarse_per_user),
        ("distinct fine per user", stats.distinct_fine_per_user),
    ]


def _histogram(histogram: dict[int, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in histogram.items())


def _frequency_lines(title: str, frequency: dict[str, int], total: int) -> list[str]:
    lines = [f"{title:<26}{'images':>9}{'share':>9}"]
    lines += [f"  {k:<24}{v:>9}{100 * v / total:>8.2f}%" for k, v in frequency.items()]
    return lines


def format_summary(stats: ExploreStats) -> str:
    """The plain-text summary printed by `python -m flair_fl.explore`."""
    lines = [f"FLAIR exploration of {stats.source}; split: {stats.scope}", ""]
    lines.append(f"{'split':<8}{'users':>10}{'images':>10}")
    lines += [f"{s:<8}{c.users:>10}{c.images:>10}" for s, c in stats.split_counts.items()]
    lines += ["", f"{'':<26}" + "".join(f"{c:>10}" for c in SUMMARY_COLUMNS)]
    for name, summary in summary_rows(stats):
        lines.append(f"{name:<26}" + "".join(f"{number(v):>10}" for v in astuple(summary)))
    lines += [
        "",
        f"coarse labels per image histogram: {_histogram(stats.coarse_per_image_hist)}",
        f"fine labels per image histogram: {_histogram(stats.fine_per_image_hist)}",
        "",
    ]
    lines += _frequency_lines("coarse label", stats.coarse_frequency, stats.num_images)
    top = dict(list(stats.fine_frequency.items())[:TOP_FINE_PRINTED])
    lines += ["", *_frequency_lines(f"top {len(top)} fine labels", top, stats.num_images)]
    lines += ["", *_hierarchy_lines(stats), "", _non_iid_line(stats)]
    return "\n".join(lines)


def _hierarchy_lines(stats: ExploreStats) -> list[str]:
    hierarchy = stats.hierarchy
    lines = [f"fine labels per coarse label ({hierarchy.source})"]
    lines += [f"  {c:<24}{n:>9}" for c, n in hierarchy.fine_per_coarse.items()]
    lines.append(f"unplaced fine labels: {len(hierarchy.unplaced)}")
    return lines


def _non_iid_line(stats: ExploreStats) -> str:
    non_iid = stats.non_iid
    return (
        f"non-IID: mean TV distance of user label mix to global: "
        f"{number(non_iid.mean_tv_distance)} over {non_iid.users} users with >= "
        f"{non_iid.min_images} images"
    )


def write_json(stats: ExploreStats, path: Path) -> Path:
    """Every statistic (all fine labels included) as JSON."""
    path.write_text(json.dumps(stats.to_dict(), indent=1) + "\n")
    return path


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _stats_markdown(stats: ExploreStats) -> list[str]:
    lines = _markdown_table(
        ["split", "users", "images"],
        [[s, f"{c.users:,}", f"{c.images:,}"] for s, c in stats.split_counts.items()],
    )
    rows = [[name, *(number(v) for v in astuple(s))] for name, s in summary_rows(stats)]
    lines += ["", *_markdown_table(["", *SUMMARY_COLUMNS], rows)]
    hierarchy = stats.hierarchy
    lines += [
        "",
        f"Fine labels per coarse label ({hierarchy.source}; {len(hierarchy.unplaced)} unplaced):",
        "",
    ]
    lines += _markdown_table(
        ["coarse label", "images", "share", "fine labels"],
        [
            [c, f"{n:,}", f"{100 * n / stats.num_images:.2f}%", str(hierarchy.fine_per_coarse[c])]
            for c, n in stats.coarse_frequency.items()
        ],
    )
    return [*lines, "", _non_iid_line(stats).replace("non-IID:", "Non-IID:") + "."]


def write_report(stats: ExploreStats, figures: dict[str, Path], path: Path) -> Path:
    """A markdown page with the statistics tables and the figures (linked relatively)."""
    lines = [f"# FLAIR dataset exploration: split `{stats.scope}`", "", f"Source: `{stats.source}`"]
    lines += ["", *_stats_markdown(stats)]
    for name, figure in figures.items():
        caption = FIGURE_CAPTIONS.get(name, name)
        lines += ["", f"## {caption}", "", f"![{caption}]({figure.relative_to(path.parent)})"]
    lines += ["", "All statistics, every fine label included: [stats.json](stats.json)", ""]
    path.write_text("\n".join(lines))
    return path
