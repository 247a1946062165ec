"""Dataset statistics, computed in one streaming pass over the users' labels.

Only labels are read (one user at a time); what is kept per user is a handful of numbers and
a coarse-label count vector, so the pass runs on the full 430k-image FLAIR file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from flair_fl.errors import FlairFormatError
from flair_fl.explore.sources import ImageLabels, LabelSource

ALL_SPLITS = "all"
NON_IID_MIN_IMAGES = 5  # users with fewer images have label shares too noisy to compare


@dataclass(frozen=True)
class Summary:
    """Distribution summary; `std` is the sample standard deviation (as pandas describes)."""

    min: float
    q25: float
    median: float
    q75: float
    mean: float
    std: float
    max: float

    @classmethod
    def of(cls, values: np.ndarray) -> Summary:
        """Summarise a non-empty array (quartiles by linear interpolation)."""
        data = np.asarray(values, dtype=np.float64)
        q25, median, q75 = np.percentile(data, [25, 50, 75])
        std = float(data.std(ddof=1)) if data.size > 1 else 0.0
        return cls(
            float(data.min()),
            float(q25),
            float(median),
            float(q75),
            float(data.mean()),
            std,
            float(data.max()),
        )


@dataclass(frozen=True)
class SplitCount:
    """Users and images of one split."""

    users: int
    images: int


@dataclass(frozen=True)
class Hierarchy:
    """Fine labels per coarse label, over the fine labels present in the scanned splits.

    Parents come from label_relationship.txt when the source has it; otherwise a fine label's
    parent is the one coarse label present on every image that carries it (FLAIR derives
    coarse labels from fine ones), and fine labels with no single such label are `unplaced`.
    """

    source: str
    fine_per_coarse: dict[str, int]
    unplaced: list[str]
    parent: dict[str, str]


@dataclass(frozen=True)
class NonIID:
    """How far users' coarse-label mixes are from the global one."""

    min_images: int
    users: int
    mean_tv_distance: float  # mean over users of 0.5 * L1(user label dist, global label dist)
    global_share: dict[str, float]  # share of images carrying each coarse label


@dataclass
class UserTable:
    """Per-user columns, users sorted by id (so every source yields the same table)."""

    user_ids: list[str]
    splits: list[str]
    num_images: np.ndarray
    distinct_coarse: np.ndarray
    distinct_fine: np.ndarray
    coarse_counts: np.ndarray  # (users, coarse labels): the user's images carrying each


@dataclass
class ExploreStats:
    """Everything the summary, the figures and the report show."""

    source: str
    scope: str
    split_counts: dict[str, SplitCount]
    coarse_labels: list[str]
    images_per_user: Summary
    coarse_per_image: Summary
    fine_per_image: Summary
    coarse_per_image_hist: dict[int, int]
    fine_per_image_hist: dict[int, int]
    coarse_frequency: dict[str, int]  # vocabulary order, absent labels as 0
    fine_frequency: dict[str, int]  # most frequent first, ties by name
    distinct_coarse_per_user: Summary
    distinct_fine_per_user: Summary
    hierarchy: Hierarchy
    non_iid: NonIID
    users: UserTable

    @property
    def num_images(self) -> int:
        return int(self.users.num_images.sum())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready statistics (the per-user table left out)."""
        out = {k: v for k, v in asdict(self).items() if k != "users"}
        out["hierarchy"].pop("parent")
        return out


class StatsAccumulator:
    """Folds users in one at a time; `finish` turns the running counts into statistics."""

    def __init__(self, coarse_labels: list[str], fine_to_coarse: dict[str, str] | None):
        self.coarse_labels = coarse_labels
        self.coarse_index = {label: i for i, label in enumerate(coarse_labels)}
        self.fine_to_coarse = fine_to_coarse
        self.coarse_frequency: Counter[str] = Counter()
        self.fine_frequency: Counter[str] = Counter()
        self.coarse_per_image: Counter[int] = Counter()
        self.fine_per_image: Counter[int] = Counter()
        self.cooccurring: dict[str, set[str]] = {}
        self.rows: list[tuple[str, str, int, int, int, np.ndarray]] = []

    def add_user(self, split: str, user_id: str, images: list[ImageLabels]) -> None:
        """Count one user's images."""
        counts = np.zeros(len(self.coarse_labels), dtype=np.int64)
        fine_seen: set[str] = set()
        for image in images:
            coarse, fine = set(image.coarse), set(image.fine)
            self._count_image(coarse, fine, user_id)
            counts[[self.coarse_index[c] for c in coarse]] += 1
            fine_seen |= fine
        distinct_coarse = int(np.count_nonzero(counts))
        self.rows.append((user_id, split, len(images), distinct_coarse, len(fine_seen), counts))

    def _count_image(self, coarse: set[str], fine: set[str], user_id: str) -> None:
        unknown = coarse - self.coarse_index.keys()
        if unknown:
            raise FlairFormatError(
                f"user {user_id}: coarse labels {sorted(unknown)} are not "
                "in the dataset's label vocabulary"
            )
        self.coarse_frequency.update(coarse)
        self.fine_frequency.update(fine)
        self.coarse_per_image[len(coarse)] += 1
        self.fine_per_image[len(fine)] += 1
        for label in fine:
            known = self.cooccurring.get(label)
            self.cooccurring[label] = set(coarse) if known is None else known & coarse

    def finish(self, source: str, scope: str) -> ExploreStats:
        """The statistics of everything added so far."""
        if not self.rows:
            raise FlairFormatError(f"{source}: no users in split '{scope}'")
        users = self._user_table()
        return ExploreStats(
            source=source,
            scope=scope,
            split_counts=_split_counts(users),
            coarse_labels=list(self.coarse_labels),
            images_per_user=Summary.of(users.num_images),
            coarse_per_image=Summary.of(_expand(self.coarse_per_image)),
            fine_per_image=Summary.of(_expand(self.fine_per_image)),
            coarse_per_image_hist=dict(sorted(self.coarse_per_image.items())),
            fine_per_image_hist=dict(sorted(self.fine_per_image.items())),
            coarse_frequency={c: self.coarse_frequency[c] for c in self.coarse_labels},
            fine_frequency=dict(
                sorted(self.fine_frequency.items(), key=lambda kv: (-kv[1], kv[0]))
            ),
            distinct_coarse_per_user=Summary.of(users.distinct_coarse),
            distinct_fine_per_user=Summary.of(users.distinct_fine),
            hierarchy=self._hierarchy(),
            non_iid=_non_iid(users, self.coarse_labels),
            users=users,
        )

    def _user_table(self) -> UserTable:
        rows = sorted(self.rows, key=lambda row: row[0])
        return UserTable(
            user_ids=[r[0] for r in rows],
            splits=[r[1] for r in rows],
            num_images=np.array([r[2] for r in rows], dtype=np.int64),
            distinct_coarse=np.array([r[3] for r in rows], dtype=np.int64),
            distinct_fine=np.array([r[4] for r in rows], dtype=np.int64),
            coarse_counts=np.stack([r[5] for r in rows]),
        )

    def _hierarchy(self) -> Hierarchy:
        if self.fine_to_coarse is not None:
            declared = self.fine_to_coarse
            parent = {f: declared[f] for f in self.fine_frequency if f in declared}
            source = "label_relationship.txt"
        else:
            parent = {f: next(iter(c)) for f, c in self.cooccurring.items() if len(c) == 1}
            source = "inferred from co-occurrence"
        per_coarse = Counter(parent.values())
        return Hierarchy(
            source=source,
            fine_per_coarse={c: per_coarse[c] for c in self.coarse_labels},
            unplaced=sorted(set(self.fine_frequency) - parent.keys()),
            parent=parent,
        )


def _expand(histogram: Counter[int]) -> np.ndarray:
    keys = np.array(sorted(histogram), dtype=np.int64)
    return np.repeat(keys, [histogram[k] for k in keys])


def _split_counts(users: UserTable) -> dict[str, SplitCount]:
    counts: dict[str, SplitCount] = {}
    splits = np.array(users.splits)
    for split in dict.fromkeys(sorted(users.splits, key=("train", "val", "test").index)):
        mask = splits == split
        counts[split] = SplitCount(int(mask.sum()), int(users.num_images[mask].sum()))
    if len(counts) > 1:
        counts[ALL_SPLITS] = SplitCount(len(users.user_ids), int(users.num_images.sum()))
    return counts


def _non_iid(users: UserTable, coarse_labels: list[str]) -> NonIID:
    totals = users.coarse_counts.sum(axis=0)
    global_share = totals / users.num_images.sum()
    # A user without coarse labels has no label distribution to compare.
    keep = (users.num_images >= NON_IID_MIN_IMAGES) & (users.coarse_counts.sum(axis=1) > 0)
    user_counts = users.coarse_counts[keep].astype(np.float64)
    user_dist = user_counts / user_counts.sum(axis=1, keepdims=True)
    tv = 0.5 * np.abs(user_dist - totals / totals.sum()).sum(axis=1)
    return NonIID(
        min_images=NON_IID_MIN_IMAGES,
        users=int(keep.sum()),
        mean_tv_distance=float(tv.mean()) if tv.size else float("nan"),
        global_share={c: float(s) for c, s in zip(coarse_labels, global_share, strict=True)},
    )


def compute_stats(
    source: LabelSource, scope: str = ALL_SPLITS, progress: bool = True
) -> ExploreStats:
    """Scan the labels of `scope` (a split, or `all`) one user at a time."""
    available = source.splits()
    if scope != ALL_SPLITS and scope not in available:
        raise FlairFormatError(
            f"{source.description}: no users in split '{scope}' "
            f"(it has: {', '.join(available) or 'none'})"
        )
    accumulator = StatsAccumulator(source.coarse_labels(), source.fine_to_coarse())
    for split in available if scope == ALL_SPLITS else [scope]:
        population = source.users(split)
        for user_id in tqdm(population, desc=f"explore {split}", unit="user", disable=not progress):
            images = source.read_labels(split, user_id)
            if len(images) != population[user_id]:
                raise FlairFormatError(
                    f"{source.description}: user {user_id} has "
                    f"{population[user_id]} images but {len(images)} label "
                    "entries"
                )
            accumulator.add_user(split, user_id, images)
    return accumulator.finish(source.description, scope)
