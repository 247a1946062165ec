"""Synthetic FLAIR: a learnable stand-in written in FLAIR's exact raw layout.

Shaped after the real dataset (docs/REFERENCE.md): the 17 coarse labels with their real
image shares (~2.8 per image), fine labels that map to them through label_relationship.txt
(the coarse names included), user-disjoint 8:1:1 splits, heavy-tailed images per user, and
non-IID users (label preferences and a photographic style of their own). Every label leaves a
visual signature (a coloured, oriented grating patch; fine labels change its frequency) that a
small CNN can learn. Deterministic from the seed.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from flair_fl.data.labels import COARSE_LABEL_SHARES, COARSE_LABELS
from flair_fl.data.raw import IMAGE_DIR, METADATA_FILE, RELATIONSHIP_FILE

COMPLETE_MARKER = ".synthetic_complete.json"
# Bump whenever the generator's output changes for the same spec: caches key on it.
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic dataset (its cache key)."""

    num_users: int = 2000
    image_size: int = 256
    seed: int = 0
    fine_per_coarse: int = 4  # fine labels per coarse label, besides the coarse name itself
    preference_strength: float = 1.0  # std of each user's label-logit shift (non-IID-ness)
    max_images_per_user: int | None = None  # default: scaled down from FLAIR's 4,151
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.num_users < 3:
            raise ValueError(f"num_users must be >= 3 (one user per split), got {self.num_users}")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [8, 1024], got {self.image_size}")

    def key(self) -> str:
        """Short stable hash of the spec, used to key caches."""
        blob = json.dumps(_marker(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def user_cap(self) -> int:
        if self.max_images_per_user is not None:
            return self.max_images_per_user
        # FLAIR's largest user has 4,151 images among 51,414 users; shrink with sqrt(users)
        # so that small sets keep "a few users with hundreds" without one user dominating.
        return max(32, int(4151 * math.sqrt(self.num_users / 51414)))


def fine_label_names(fine_per_coarse: int) -> dict[str, str]:
    """{fine: coarse}; each coarse label is also a fine label of itself, as in FLAIR."""
    mapping: dict[str, str] = {}
    for coarse in COARSE_LABELS:
        mapping[coarse] = coarse
        for j in range(1, fine_per_coarse + 1):
            mapping[f"{coarse}_{j}"] = coarse
    return mapping


def images_per_user(rng: np.random.Generator, num_users: int, cap: int) -> np.ndarray:
    """Heavy-tailed counts shaped like FLAIR's (25% 1, median 2, 75% ~5, mean ~8)."""
    counts = np.ceil(rng.lognormal(mean=0.45, sigma=1.8, size=num_users))
    return np.clip(counts, 1, cap).astype(np.int64)


def calibrated_logits(shares: np.ndarray, strength: float) -> np.ndarray:
    """Base logits b with E_z[sigmoid(b + strength * z)] = share, z ~ N(0, 1).

    Users shift each label's logit by strength * z; without this calibration the average
    share of rare labels would be inflated (sigmoid is convex in its lower tail).
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    weights = weights / weights.sum()
    low, high = np.full_like(shares, -20.0), np.full_like(shares, 20.0)
    for _ in range(60):  # bisection: the expectation is increasing in b
        mid = (low + high) / 2
        mean = (weights / (1 + np.exp(-(mid[:, None] + strength * nodes)))).sum(axis=1)
        low, high = np.where(mean < shares, mid, low), np.where(mean < shares, high, mid)
    return (low + high) / 2


def _label_signatures() -> tuple[np.ndarray, np.ndarray]:
    """Per coarse label: an RGB colour and a grating orientation, all distinct."""
    n = len(COARSE_LABELS)
    colors = np.array(
        [colorsys.hsv_to_rgb(k / n, 1.0 if k % 2 else 0.7, 1.0 if k % 3 else 0.7) for k in range(n)]
    )
    angles = np.array([(k * 7 % n) * math.pi / n for k in range(n)])
    return colors, angles


class _Painter:
    """Draws images: user style + noise + one grating patch per coarse label.

    Patches sit in distinct cells of a jittered 3x3 grid (no occlusion; FLAIR images carry
    at most 9 coarse labels). A coarse label sets the patch's colour and grating
    orientation; each of its fine labels adds one grating frequency.
    """

    CELLS = 3

    def __init__(self, size: int):
        self.size = size
        self.colors, self.angles = _label_signatures()
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        self.yy, self.xx = yy, xx

    def paint(
        self,
        rng: np.random.Generator,
        style_gain: np.ndarray,
        style_offset: float,
        style_tint: np.ndarray,
        patches: dict[int, list[int]],
    ) -> np.ndarray:
        s = self.size
        image = np.empty((s, s, 3), dtype=np.float32)
        image[:] = style_tint
        image += rng.normal(0.0, 0.06, size=(s, s, 3)).astype(np.float32)
        cell = s // self.CELLS
        cells = rng.permutation(self.CELLS * self.CELLS)
        for slot, (coarse, fine_ranks) in enumerate(patches.items()):
            row, col = divmod(int(cells[slot % len(cells)]), self.CELLS)
            side = max(2, int(rng.uniform(0.75, 1.0) * cell))
            y0 = row * cell + int(rng.integers(0, cell - side + 1))
            x0 = col * cell + int(rng.integers(0, cell - side + 1))
            yy = self.yy[y0 : y0 + side, x0 : x0 + side]
            xx = self.xx[y0 : y0 + side, x0 : x0 + side]
            theta = self.angles[coarse]
            along = xx * math.cos(theta) + yy * math.sin(theta)
            wave = np.zeros_like(along)
            for rank in fine_ranks:
                freq = 4.0 + 3.0 * rank  # cycles per image width
                wave += np.sin(2 * math.pi * freq * along + rng.uniform(0, 2 * math.pi))
            wave = 0.5 + 0.5 * wave / max(1, len(fine_ranks))
            patch = self.colors[coarse][None, None, :] * (0.6 + 0.4 * wave[..., None])
            image[y0 : y0 + side, x0 : x0 + side] = patch
        image = image * style_gain + style_offset
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _sample_labels(
    rng: np.random.Generator, user_logits: np.ndarray, children: list[list[str]]
) -> dict[int, list[int]]:
    """{coarse index: ranks of its fine labels} for one image (at least one label)."""
    probs = 1.0 / (1.0 + np.exp(-user_logits))
    present = np.flatnonzero(rng.random(len(probs)) < probs)
    if present.size == 0:  # every FLAIR image has at least one label
        present = np.array([rng.choice(len(probs), p=probs / probs.sum())])
    chosen: dict[int, list[int]] = {}
    for coarse in present:
        options = len(children[coarse])
        k = min(options, int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])))
        chosen[int(coarse)] = sorted(int(r) for r in rng.choice(options, size=k, replace=False))
    return chosen


def generate_synthetic_flair(out_dir: str | Path, spec: SyntheticSpec | None = None) -> Path:
    """Write a synthetic FLAIR directory (raw layout) to `out_dir` and return it.

    The metadata JSON and a completion marker are written last, so an interrupted run never
    leaves a directory that loads as a complete dataset.
    """
    spec = spec or SyntheticSpec()
    out = Path(out_dir)
    image_dir = out / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE_MARKER).unlink(missing_ok=True)
    rng = np.random.default_rng(spec.seed)

    fine_to_coarse = fine_label_names(spec.fine_per_coarse)
    children = [[f for f, c in fine_to_coarse.items() if c == coarse] for coarse in COARSE_LABELS]
    shares = np.array([COARSE_LABEL_SHARES[c] for c in COARSE_LABELS])
    base_logits = calibrated_logits(shares, spec.preference_strength)

    counts = images_per_user(rng, spec.num_users, spec.user_cap())
    order = rng.permutation(spec.num_users)
    n_val = max(1, round(0.1 * spec.num_users))
    n_test = max(1, round(0.1 * spec.num_users))
    partition = np.full(spec.num_users, "train", dtype=object)
    partition[order[:n_val]] = "val"
    partition[order[n_val : n_val + n_test]] = "test"

    user_ids = _unique_ids(
        rng, spec.num_users, lambda r: f"{r.integers(10**7, 10**8)}@N0{r.integers(0, 9)}"
    )
    image_ids = _unique_ids(rng, int(counts.sum()), lambda r: str(r.integers(10**9, 10**11)))
    painter = _Painter(spec.image_size)
    user_seeds = np.random.SeedSequence(spec.seed).spawn(spec.num_users)

    records: list[dict[str, object]] = []
    next_image = 0
    for u in range(spec.num_users):
        urng = np.random.default_rng(user_seeds[u])
        logits = base_logits + spec.preference_strength * urng.normal(size=len(shares))
        gain = urng.uniform(0.9, 1.1, size=3).astype(np.float32)
        offset = float(urng.uniform(-0.08, 0.08))
        tint = urng.uniform(0.3, 0.5, size=3).astype(np.float32)
        for _ in range(counts[u]):
            patches = _sample_labels(urng, logits, children)
            image_id = image_ids[next_image]
            next_image += 1
            pixels = painter.paint(urng, gain, offset, tint, patches)
            _write_jpeg(image_dir / f"{image_id}.jpg", pixels, spec.jpeg_quality)
            records.append(
                {
                    "user_id": user_ids[u],
                    "image_id": image_id,
                    "labels": [COARSE_LABELS[c] for c in patches],
                    "partition": str(partition[u]),
                    "fine_grained_labels": sorted(
                        children[c][r] for c, ranks in patches.items() for r in ranks
                    ),
                }
            )

    (out / RELATIONSHIP_FILE).write_text(
        "".join(f"{fine} -> {coarse}\n" for fine, coarse in fine_to_coarse.items())
    )
    (out / METADATA_FILE).write_text(json.dumps(records))
    (out / COMPLETE_MARKER).write_text(json.dumps(_marker(spec), sort_keys=True))
    return out


def is_complete(out_dir: str | Path, spec: SyntheticSpec) -> bool:
    """Whether `out_dir` holds a finished dataset generated from exactly `spec`."""
    marker = Path(out_dir) / COMPLETE_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == _marker(spec)


def _marker(spec: SyntheticSpec) -> dict[str, object]:
    return {**asdict(spec), "generator_version": GENERATOR_VERSION}


def _unique_ids(
    rng: np.random.Generator, n: int, make: Callable[[np.random.Generator], str]
) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        candidate = make(rng)
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


def _write_jpeg(path: Path, pixels: np.ndarray, quality: int) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())
