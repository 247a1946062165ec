"""The synthetic generator reproduces FLAIR's shape (docs/REFERENCE.md), deterministically."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flair_fl.data.labels import COARSE_LABEL_SHARES, COARSE_LABELS, SPLITS
from flair_fl.data.raw import IMAGE_DIR, METADATA_FILE, RELATIONSHIP_FILE, load_label_relationship
from flair_fl.data.synthetic import SyntheticSpec, generate_synthetic_flair

NUM_USERS = 300  # enough for stable statistics: ~2.3k images of 16 px, a few seconds


def load_records(root: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads((root / METADATA_FILE).read_text())
    return records


def coarse_matrix(records: list[dict[str, Any]]) -> np.ndarray:
    """Multi-hot (images, 17) matrix of coarse labels, alphabetical columns."""
    index = {label: i for i, label in enumerate(COARSE_LABELS)}
    matrix = np.zeros((len(records), len(COARSE_LABELS)))
    for row, record in enumerate(records):
        matrix[row, [index[label] for label in record["labels"]]] = 1.0
    return matrix


def user_index(records: list[dict[str, Any]]) -> np.ndarray:
    _, inverse = np.unique([r["user_id"] for r in records], return_inverse=True)
    return np.asarray(inverse)


def images_per_user(records: list[dict[str, Any]]) -> np.ndarray:
    return np.bincount(user_index(records))


@pytest.fixture(scope="module")
def stats_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticSpec(num_users=NUM_USERS, image_size=16, seed=0)
    return generate_synthetic_flair(tmp_path_factory.mktemp("stats"), spec)


@pytest.fixture(scope="module")
def records(stats_raw: Path) -> list[dict[str, Any]]:
    return load_records(stats_raw)


def test_images_per_user_are_heavy_tailed(records: list[dict[str, Any]]) -> None:
    # Prepare / Execute
    counts = images_per_user(records)

    # Assert: FLAIR has min 1, 25% 1, median 2, mean 8.35, max 4,151
    median = float(np.median(counts))
    assert counts.min() >= 1
    assert np.quantile(counts, 0.25) == 1
    assert median <= 3
    assert counts.mean() > 2 * median
    assert counts.max() > 20 * median


def test_coarse_label_shares_match_flair(records: list[dict[str, Any]]) -> None:
    # Prepare
    target = np.array([COARSE_LABEL_SHARES[label] for label in COARSE_LABELS])

    # Execute
    shares = coarse_matrix(records).mean(axis=0)

    # Assert. Shares are pooled over images, so the few users with hundreds of images (each
    # with its own label preferences) dominate them; over 20 seeds the worst label misses its
    # target by at most 0.6x this tolerance, typically ~0.35x. Uniform labels (2.8/17 = 0.165
    # each) miss `equipment` and `structure` by ~0.36 and `religion` by ~0.16 and fail.
    tolerance = 0.06 + 0.3 * target
    assert np.all(np.abs(shares - target) <= tolerance), dict(
        zip(COARSE_LABELS, shares, strict=True)
    )
    # the order of frequencies is FLAIR's too (rank correlation; >= 0.97 over 20 seeds)
    rank_corr = np.corrcoef(np.argsort(np.argsort(shares)), np.argsort(np.argsort(target)))[0, 1]
    assert rank_corr > 0.9


def test_labels_per_image(records: list[dict[str, Any]]) -> None:
    # Prepare / Execute
    coarse = np.array([len(r["labels"]) for r in records])
    fine = np.array([len(r["fine_grained_labels"]) for r in records])

    # Assert: FLAIR has 2.79 coarse (min 1) and 4.62 fine (min 1) labels per image
    assert coarse.min() >= 1 and fine.min() >= 1
    assert 2.5 <= coarse.mean() <= 3.1
    assert 4.0 <= fine.mean() <= 5.3
    assert all(len(set(r["labels"])) == len(r["labels"]) for r in records)


def test_fine_labels_map_to_the_coarse_labels_of_their_image(
    stats_raw: Path, records: list[dict[str, Any]]
) -> None:
    # Prepare
    fine_to_coarse = load_label_relationship(stats_raw / RELATIONSHIP_FILE)

    # Execute
    parents = [{fine_to_coarse.get(f) for f in r["fine_grained_labels"]} for r in records]

    # Assert: every fine label is mapped, to a coarse label of its image, and every coarse
    # label of an image has at least one fine label
    assert all(p == set(r["labels"]) for p, r in zip(parents, records, strict=True))
    assert set(fine_to_coarse.values()) == set(COARSE_LABELS)


def test_fine_vocabulary_contains_the_coarse_names(
    stats_raw: Path, records: list[dict[str, Any]]
) -> None:
    # Prepare / Execute
    fine_to_coarse = load_label_relationship(stats_raw / RELATIONSHIP_FILE)
    used_fine = {f for r in records for f in r["fine_grained_labels"]}

    # Assert: as in FLAIR, a coarse name is also a fine label (of itself)
    assert all(fine_to_coarse[c] == c for c in COARSE_LABELS)
    assert {"structure", "equipment", "plant"} <= used_fine
    assert len(fine_to_coarse) == len(COARSE_LABELS) * (1 + SyntheticSpec().fine_per_coarse)


def test_splits_are_user_disjoint_8_1_1(records: list[dict[str, Any]]) -> None:
    # Prepare / Execute
    partitions: dict[str, set[str]] = {}
    for r in records:
        partitions.setdefault(r["user_id"], set()).add(r["partition"])
    users_per_split = {s: sum(p == {s} for p in partitions.values()) for s in SPLITS}

    # Assert
    assert all(len(p) == 1 for p in partitions.values())
    assert sum(users_per_split.values()) == NUM_USERS
    assert users_per_split["val"] == users_per_split["test"] == NUM_USERS // 10
    assert users_per_split["train"] == NUM_USERS - 2 * (NUM_USERS // 10)


def user_heterogeneity(labels: np.ndarray, users: np.ndarray) -> float:
    """Pearson chi-square of user x label counts against the pooled label shares.

    Summed over users with >= 2 images and labels with share >= 5% (rare labels would make
    the statistic a lottery on a few images). Under IID sampling each user contributes about
    one unit per label, whatever its size; user-specific preferences inflate it.
    """
    shares = labels.mean(axis=0)
    common = shares >= 0.05
    labels, shares = labels[:, common], shares[common]
    sizes = np.bincount(users)
    sums = np.zeros((len(sizes), labels.shape[1]))
    np.add.at(sums, users, labels)
    keep = sizes >= 2
    expected = sizes[keep, None] * shares
    return float(((sums[keep] - expected) ** 2 / (expected * (1 - shares))).sum())


def iid_heterogeneity(labels: np.ndarray, users: np.ndarray, rounds: int = 20) -> Iterator[float]:
    """The statistic after shuffling images across users: IID with the same user sizes."""
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        yield user_heterogeneity(labels[rng.permutation(len(labels))], users)


def test_users_are_non_iid(records: list[dict[str, Any]]) -> None:
    # Prepare
    labels, users = coarse_matrix(records), user_index(records)

    # Execute
    observed = user_heterogeneity(labels, users)
    under_iid = np.array(list(iid_heterogeneity(labels, users)))

    # Assert: over 8 seeds the ratio is 1.9-3.0; permutations vary by ~10% around their mean
    assert observed > under_iid.max()
    assert observed > 1.5 * under_iid.mean()


def test_heterogeneity_statistic_does_not_fire_for_iid_users(tmp_path: Path) -> None:
    # Prepare: the same generator without per-user label preferences (labels are IID)
    spec = SyntheticSpec(num_users=250, image_size=8, seed=0, preference_strength=0.0)
    records = load_records(generate_synthetic_flair(tmp_path, spec))
    labels, users = coarse_matrix(records), user_index(records)

    # Execute
    observed = user_heterogeneity(labels, users)
    under_iid = np.array(list(iid_heterogeneity(labels, users)))

    # Assert: over 8 seeds the ratio is 0.94-1.09
    assert observed < 1.25 * under_iid.mean()


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    # Prepare
    spec = SyntheticSpec(num_users=12, image_size=16, seed=7)

    # Execute
    first = generate_synthetic_flair(tmp_path / "a", spec)
    second = generate_synthetic_flair(tmp_path / "b", spec)

    # Assert
    for name in (METADATA_FILE, RELATIONSHIP_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    images = sorted(p.name for p in (first / IMAGE_DIR).iterdir())
    assert images == sorted(p.name for p in (second / IMAGE_DIR).iterdir())
    assert len(images) == len(load_records(first))
    for name in images:
        assert (first / IMAGE_DIR / name).read_bytes() == (second / IMAGE_DIR / name).read_bytes()


def test_different_seed_differs(tmp_path: Path) -> None:
    # Prepare
    first = generate_synthetic_flair(
        tmp_path / "a", SyntheticSpec(num_users=12, image_size=16, seed=7)
    )

    # Execute
    second = generate_synthetic_flair(
        tmp_path / "b", SyntheticSpec(num_users=12, image_size=16, seed=8)
    )

    # Assert
    a, b = load_records(first), load_records(second)
    assert a != b
    assert {r["user_id"] for r in a}.isdisjoint({r["user_id"] for r in b})
