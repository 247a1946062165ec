"""`python -m flair_fl.explore`: statistics checked against the raw JSON, report files,
and the same statistics from the raw directory and every HDF5 layout."""

from __future__ import annotations

import contextlib
import io
import json
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.prepare import prepare_flair
from flair_fl.data.raw import RawFlair
from flair_fl.explore.__main__ import main
from flair_fl.explore.samples import draw_samples
from flair_fl.explore.sources import HDF5Source, LabelSource, RawSource
from flair_fl.explore.stats import ExploreStats, compute_stats

FIGURES = (
    "images_per_user",
    "labels_per_image",
    "label_frequency",
    "labels_per_user",
    "hierarchy",
    "non_iid",
    "samples",
)
SUMMARY_NAMES = (
    "images per user",
    "coarse labels per image",
    "fine labels per image",
    "distinct coarse per user",
    "distinct fine per user",
)


# ----- independent expectations, from labels_and_metadata.json and label_relationship.txt


def describe(values: list[int]) -> list[float]:
    """min, q25, median, q75, mean, sample std, max (quartiles as numpy's linear method)."""
    q25, median, q75 = statistics.quantiles(values, n=4, method="inclusive")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return [min(values), q25, median, q75, statistics.fmean(values), std, max(values)]


def expected_stats(raw_dir: Path, split: str, non_iid_min_images: int) -> dict[str, Any]:
    records = json.loads((raw_dir / "labels_and_metadata.json").read_text())
    scoped = [r for r in records if split == "all" or r["partition"] == split]
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in scoped:
        by_user[record["user_id"]].append(record)
    splits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for user_records in by_user.values():
        splits[user_records[0]["partition"]][0] += 1
        splits[user_records[0]["partition"]][1] += len(user_records)
    if len(splits) > 1:
        splits["all"] = [len(by_user), len(scoped)]
    coarse = Counter(label for r in scoped for label in set(r["labels"]))
    fine = Counter(label for r in scoped for label in set(r["fine_grained_labels"]))
    relationship = dict(
        line.split(" -> ") for line in (raw_dir / "label_relationship.txt").read_text().splitlines()
    )
    return {
        "splits": splits,
        "images per user": describe([len(rs) for rs in by_user.values()]),
        "coarse labels per image": describe([len(set(r["labels"])) for r in scoped]),
        "fine labels per image": describe([len(set(r["fine_grained_labels"])) for r in scoped]),
        "distinct coarse per user": describe(
            [len({c for r in rs for c in r["labels"]}) for rs in by_user.values()]
        ),
        "distinct fine per user": describe(
            [len({f for r in rs for f in r["fine_grained_labels"]}) for rs in by_user.values()]
        ),
        "coarse histogram": Counter(len(set(r["labels"])) for r in scoped),
        "fine histogram": Counter(len(set(r["fine_grained_labels"])) for r in scoped),
        "images": len(scoped),
        "coarse": coarse,
        "top fine": sorted(fine.items(), key=lambda kv: (-kv[1], kv[0]))[:20],
        "fine per coarse": Counter(relationship[f] for f in fine),
        "non-iid": expected_non_iid(by_user, coarse, non_iid_min_images),
    }


def expected_non_iid(
    by_user: dict[str, list[dict[str, Any]]], coarse: Counter[str], min_images: int
) -> tuple[int, float]:
    """(users compared, mean total-variation distance of their label mix to the global one)."""
    total = sum(coarse.values())
    distances = []
    for records in by_user.values():
        if len(records) >= min_images:
            mine = Counter(label for r in records for label in set(r["labels"]))
            n = sum(mine.values())
            distances.append(0.5 * sum(abs(mine[c] / n - coarse[c] / total) for c in coarse))
    return len(distances), statistics.fmean(distances) if distances else float("nan")


# ----- parsing the printed summary


def table_rows(text: str, header: str) -> dict[str, list[str]]:
    """Rows `  name  value ...` of the block whose first line matches the regex `header`."""
    block = next(b for b in text.split("\n\n") if re.match(header, b))
    return {
        line.split()[0]: line.split()[1:] for line in block.splitlines()[1:] if line[:2] == "  "
    }


def numbers_of(text: str, name: str) -> list[float]:
    match = re.search(rf"^{name}\s+([-\d. nan]+)$", text, re.MULTILINE)
    assert match, f"no summary row {name!r} in:\n{text}"
    return [float(x) for x in match.group(1).split()]


def histogram_of(text: str, name: str) -> Counter[int]:
    match = re.search(rf"^{name} labels per image histogram: (.*)$", text, re.MULTILINE)
    assert match
    return Counter(
        {int(k): int(v) for k, v in (pair.split(":") for pair in match.group(1).split())}
    )


# ----- fixtures


@pytest.fixture(scope="module")
def hdf5_files(tiny_raw: Path, tiny_hdf5: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("explore_h5")
    files = {"pfl": tiny_hdf5}
    for layout in ("mlflair", "central"):
        files[layout] = prepare_flair(tiny_raw, folder / f"{layout}.hdf5", layout, progress=False)  # type: ignore[arg-type]
    return files


def run_cli(args: list[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(args)
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def cli_runs(
    tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, str]]:
    """The command on the raw directory: all splits, and val only with one user's samples."""
    runs = {}
    val_user = next(
        r["user_id"]
        for r in json.loads((tiny_raw / "labels_and_metadata.json").read_text())
        if r["partition"] == "val"
    )
    for split, extra in (("all", []), ("val", ["--user", val_user, "--seed", "7"])):
        out = tmp_path_factory.mktemp(f"report_{split}")
        code, text = run_cli([str(tiny_raw), "--out", str(out), "--split", split, *extra])
        assert code == 0
        runs[split] = (out, text)
    return runs


# ----- tests


@pytest.mark.parametrize("split", ["all", "val"])
def test_printed_statistics_equal_values_computed_from_the_raw_json(cli_runs, tiny_raw, split):
    _, text = cli_runs[split]
    min_images = int(re.search(r"users with >= (\d+) images", text).group(1))  # type: ignore[union-attr]

    expected = expected_stats(tiny_raw, split, min_images)

    for name, (users, images) in expected["splits"].items():
        assert re.search(rf"^{name}\s+{users}\s+{images}$", text, re.MULTILINE), name
    for name in SUMMARY_NAMES:
        assert numbers_of(text, name) == pytest.approx(expected[name], abs=5.01e-4), name
    assert histogram_of(text, "coarse") == expected["coarse histogram"]
    assert histogram_of(text, "fine") == expected["fine histogram"]
    coarse_rows = table_rows(text, r"coarse label\s+images")
    assert {c: int(row[0]) for c, row in coarse_rows.items() if int(row[0])} == expected["coarse"]
    for label, row in coarse_rows.items():
        share = 100 * expected["coarse"][label] / expected["images"]
        assert float(row[1].rstrip("%")) == pytest.approx(share, abs=0.005)
    fine_rows = table_rows(text, r"top \d+ fine labels\s+images")
    assert [(f, int(row[0])) for f, row in fine_rows.items()] == expected["top fine"]
    hierarchy = table_rows(text, r"fine labels per coarse label \(")
    assert {c: int(row[0]) for c, row in hierarchy.items() if int(row[0])} == expected[
        "fine per coarse"
    ]
    users, distance = expected["non-iid"]
    match = re.search(r"global: (\S+) over (\d+) users", text)
    assert match and int(match.group(2)) == users
    assert float(match.group(1)) == pytest.approx(distance, abs=5e-4, nan_ok=True)


@pytest.mark.parametrize("split", ["all", "val"])
def test_report_files_exist_and_figures_are_nontrivial_pngs(cli_runs, split):
    out, text = cli_runs[split]

    report = (out / "report.md").read_text()
    stats = json.loads((out / "stats.json").read_text())

    assert f"report: {out / 'report.md'}" in text
    assert stats["scope"] == split
    for name in FIGURES:
        assert f"]({name}.png)" in report
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 250
            gray = np.asarray(image.convert("L"), dtype=np.float64)
        assert gray.std() > 10, f"{name}.png looks blank"
        assert (gray < 200).mean() > 0.01, f"{name}.png has almost nothing drawn"


def source_of(kind: str, tiny_raw: Path, hdf5_files: dict[str, Path], relationship: bool = True):
    if kind == "raw":
        return RawSource(tiny_raw)
    return HDF5Source(
        hdf5_files[kind], tiny_raw / "label_relationship.txt" if relationship else None
    )


def comparable(stats: ExploreStats) -> dict[str, Any]:
    table = stats.users
    out = {k: v for k, v in stats.to_dict().items() if k != "source"}
    out["users"] = (
        table.user_ids,
        table.splits,
        table.num_images.tolist(),
        table.distinct_coarse.tolist(),
        table.distinct_fine.tolist(),
        table.coarse_counts.tolist(),
    )
    return out


@pytest.mark.parametrize("layout", ["pfl", "mlflair", "central"])
@pytest.mark.parametrize("split", ["all", "train"])
def test_hdf5_layouts_give_the_statistics_of_the_raw_directory(tiny_raw, hdf5_files, layout, split):
    from_raw = compute_stats(source_of("raw", tiny_raw, hdf5_files), split, progress=False)

    from_hdf5 = compute_stats(source_of(layout, tiny_raw, hdf5_files), split, progress=False)

    assert comparable(from_hdf5) == comparable(from_raw)
    assert layout in from_hdf5.source


@pytest.mark.parametrize("layout", ["pfl", "central"])
def test_inferred_hierarchy_agrees_with_label_relationship(tiny_raw, hdf5_files, layout):
    source = source_of(layout, tiny_raw, hdf5_files, relationship=False)
    truth = RawSource(tiny_raw).raw.fine_to_coarse

    hierarchy = compute_stats(source, progress=False).hierarchy

    assert hierarchy.source == "inferred from co-occurrence"
    assert all(truth[fine] == coarse for fine, coarse in hierarchy.parent.items())
    assert len(hierarchy.parent) > 3 * len(hierarchy.unplaced)  # frequent labels get placed
    assert sum(hierarchy.fine_per_coarse.values()) == len(hierarchy.parent)


def test_statistics_read_no_image(tiny_raw, hdf5_files, monkeypatch):
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("statistics must not read images")

    monkeypatch.setattr(RawFlair, "read_image", forbidden)
    for name in ("read_image", "read_user"):
        monkeypatch.setattr(FlairHDF5, name, forbidden)

    for kind in ("raw", "pfl", "mlflair", "central"):
        assert compute_stats(source_of(kind, tiny_raw, hdf5_files), progress=False).num_images


def draw(source: LabelSource, seed: int, user: str | None = None, count: int = 6):
    stats = compute_stats(source, progress=False)
    return draw_samples(source, stats.users, count, seed, user)


def test_samples_are_seeded_and_carry_their_own_labels(tiny_raw, hdf5_files):
    raw = RawSource(tiny_raw)
    records = defaultdict(list)
    for record in json.loads((tiny_raw / "labels_and_metadata.json").read_text()):
        records[record["user_id"]].append(record)
    busiest = max(records, key=lambda user: len(records[user]))

    samples = draw(raw, seed=1)
    again = draw(HDF5Source(hdf5_files["pfl"]), seed=1)
    other_seed = draw(raw, seed=2)
    one_user = draw(raw, seed=1, user=busiest, count=4)

    assert len(samples) == 6 and len({(s.user_id, s.index) for s in samples}) == 6
    assert [(s.user_id, s.index) for s in again] == [(s.user_id, s.index) for s in samples]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, samples, strict=True))
    assert [(s.user_id, s.index) for s in other_seed] != [(s.user_id, s.index) for s in samples]
    assert {s.user_id for s in one_user} == {busiest} and len(one_user) == 4
    for sample in samples + one_user:
        record = records[sample.user_id][sample.index]
        assert sample.labels.coarse == tuple(record["labels"])
        assert sample.labels.fine == tuple(record["fine_grained_labels"])
        with Image.open(tiny_raw / "small_images" / f"{record['image_id']}.jpg") as image:
            assert np.array_equal(sample.image, np.asarray(image.convert("RGB")))


def test_cli_reports_bad_input_with_exit_status_2(tiny_raw, tmp_path, capsys):
    missing = run_cli([str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")])
    no_user = run_cli([str(tiny_raw), "--out", str(tmp_path / "b"), "--user", "nobody@N00"])

    assert missing[0] == 2 and no_user[0] == 2
    errors = capsys.readouterr().err
    assert "no such raw FLAIR directory or HDF5 file" in errors
    assert "'nobody@N00' is not in the explored split(s)" in errors
