"""A seeded draw of images to look at, reading only the drawn ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flair_fl.errors import FlairFormatError
from flair_fl.explore.sources import ImageLabels, LabelSource
from flair_fl.explore.stats import UserTable


@dataclass(frozen=True)
class Sample:
    """One drawn image with where it came from and its labels."""

    split: str
    user_id: str
    index: int  # position among the user's images
    image: np.ndarray
    labels: ImageLabels


def draw_samples(
    source: LabelSource,
    users: UserTable,
    count: int,
    seed: int,
    user_id: str | None = None,
) -> list[Sample]:
    """Draw up to `count` distinct images uniformly from `users` (or from one user).

    Images are numbered in user-id order, then in each user's stored order, so a seed draws
    the same images from a raw directory and from a per-user HDF5 of it (the central layout
    of ml-flair's own script keeps no order and reads in image-id order, so its draw differs).
    """
    rows = np.arange(len(users.user_ids))
    if user_id is not None:
        if user_id not in users.user_ids:
            raise FlairFormatError(f"user {user_id!r} is not in the explored split(s)")
        rows = np.array([users.user_ids.index(user_id)])
    sizes = users.num_images[rows]
    ends = np.cumsum(sizes)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(int(ends[-1]), size=min(count, int(ends[-1])), replace=False))
    owners = np.searchsorted(ends, picks, side="right")
    label_cache: dict[str, list[ImageLabels]] = {}
    samples = []
    for pick, owner in zip(picks, owners, strict=True):
        row = int(rows[owner])
        user, split = users.user_ids[row], users.splits[row]
        index = int(pick - (ends[owner] - sizes[owner]))
        if user not in label_cache:
            label_cache[user] = source.read_labels(split, user)
        image = source.read_image(split, user, index)
        samples.append(Sample(split, user, index, image, label_cache[user][index]))
    return samples
