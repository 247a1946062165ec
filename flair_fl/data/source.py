"""Data sources that Hydra's `data` group instantiates: a prepared HDF5 file, ready to read.

`synthetic` generates a synthetic FLAIR set and its HDF5 once, cached under a directory keyed
by the generator's parameters (a changed parameter gives a new key, so a rebuild); `flair`
points at a prepared real FLAIR file.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from flair_fl.data.hdf5 import FlairHDF5, FlairReader, LabelSet
from flair_fl.data.partition import IidPartition
from flair_fl.data.prepare import prepare_flair
from flair_fl.data.synthetic import SyntheticSpec, generate_synthetic_flair, is_complete
from flair_fl.errors import ConfigError, FlairFormatError

log = logging.getLogger(__name__)
HDF5_NAME = "flair.hdf5"
PARTITIONS = ("natural", "iid")


def open_reader(
    hdf5_path: str | Path, partition: str = "natural", iid_user_size: int = 10, iid_seed: int = 0
) -> FlairReader:
    """The reader of a run, from plain values: the driver and every client build the same.

    `natural`: FLAIR's users; `iid`: train images shuffled into pseudo-users of
    `iid_user_size` images (flair_fl.data.partition).
    """
    if partition not in PARTITIONS:
        raise ValueError(f"data.partition must be one of {PARTITIONS}, got {partition!r}")
    reader = FlairHDF5(hdf5_path)
    return IidPartition(reader, iid_user_size, iid_seed) if partition == "iid" else reader


@dataclass
class FederatedData:
    """A prepared FLAIR HDF5 file and how to read it."""

    hdf5_path: Path
    label_set: LabelSet = "coarse"
    input_size: int = 224
    binary_label: str | None = None  # ml-flair's binary mode: one label as the only target
    partition: str = "natural"  # natural | iid (pseudo-users of iid_user_size train images)
    iid_user_size: int = 10
    iid_seed: int = 0

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONS:
            raise ValueError(f"data.partition must be one of {PARTITIONS}, got {self.partition!r}")
        if self.iid_user_size < 1:
            raise ValueError(f"data.iid_user_size must be >= 1, got {self.iid_user_size}")
        if self.label_set not in ("coarse", "fine"):
            raise ValueError(f"data.label_set must be 'coarse' or 'fine', got {self.label_set!r}")
        if self.input_size < 8:
            raise ValueError(f"data.input_size must be >= 8, got {self.input_size}")

    @cached_property
    def reader(self) -> FlairReader:
        return open_reader(self.hdf5_path, **self.reader_settings())

    def reader_settings(self) -> dict[str, Any]:
        """Plain values that rebuild `reader` anywhere (ClientSpec ships them to clients)."""
        return {
            "partition": self.partition,
            "iid_user_size": self.iid_user_size,
            "iid_seed": self.iid_seed,
        }

    @property
    def num_labels(self) -> int:
        """Model outputs: 1 in binary mode, else the size of the label set."""
        return 1 if self.binary_label else self.reader.num_labels(self.label_set)

    @cached_property
    def label_index(self) -> int | None:
        """Column of `binary_label` in the label set's multi-hot targets (binary mode)."""
        if self.binary_label is None:
            return None
        mapping = self.reader.label_mapping(self.label_set)
        if self.binary_label not in mapping:
            raise ValueError(
                f"data.binary_label={self.binary_label!r} is not a {self.label_set} label "
                f"of {self.hdf5_path} (e.g. {', '.join(sorted(mapping)[:5])}, ...)"
            )
        return mapping[self.binary_label]

    def require_splits(self, *splits: str) -> None:
        """Fail with a clear message if the file lacks a split the run needs."""
        present = self.reader.splits()
        for split in splits:
            if split not in present or not self.reader.population(split):
                raise FlairFormatError(
                    f"{self.hdf5_path}: the run needs the '{split}' split, which is missing "
                    f"or empty (splits present: {', '.join(present) or 'none'})"
                )


def check_label(data: FederatedData) -> None:
    """Refuse an unknown `data.binary_label` now (the label mapping is in the file's
    metadata), not in the first evaluation."""
    try:
        data.label_index  # noqa: B018 (cached: read once, here)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def hdf5_data(
    path: str | Path,
    label_set: LabelSet = "coarse",
    input_size: int = 224,
    binary_label: str | None = None,
    partition: str = "natural",
    iid_user_size: int = 10,
    iid_seed: int = 0,
) -> FederatedData:
    """`data=flair`: an HDF5 file prepared by scripts/prepare_flair.py."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FlairFormatError(
            f"data.path={path}: no prepared FLAIR HDF5 file there. Create it with\n"
            f"  python scripts/download_flair.py --dataset-dir data/flair\n"
            f"  python scripts/prepare_flair.py --dataset-dir data/flair --output {path}\n"
            f"or run on the synthetic default (data=synthetic)."
        )
    return FederatedData(
        path, label_set, input_size, binary_label, partition, iid_user_size, iid_seed
    )


def synthetic_data(
    num_users: int = 300,
    image_size: int = 32,
    seed: int = 0,
    fine_per_coarse: int = 4,
    cache_dir: str | Path = ".cache/flair_fl",
    label_set: LabelSet = "coarse",
    input_size: int | None = None,
    binary_label: str | None = None,
    partition: str = "natural",
    iid_user_size: int = 10,
    iid_seed: int = 0,
) -> FederatedData:
    """`data=synthetic`: generate (once) and prepare a synthetic FLAIR set."""
    spec = SyntheticSpec(
        num_users=num_users, image_size=image_size, seed=seed, fine_per_coarse=fine_per_coarse
    )
    root = Path(cache_dir).expanduser() / f"synthetic-{spec.key()}"
    hdf5 = root / HDF5_NAME
    if not (hdf5.is_file() and is_complete(root / "raw", spec)):
        log.info("Generating synthetic FLAIR (%d users, %d px) in %s", num_users, image_size, root)
        hdf5.unlink(missing_ok=True)
        shutil.rmtree(root / "raw", ignore_errors=True)
        generate_synthetic_flair(root / "raw", spec)
        prepare_flair(root / "raw", hdf5, progress=False)
    return FederatedData(
        hdf5,
        label_set,
        input_size or image_size,
        binary_label=binary_label,
        partition=partition,
        iid_user_size=iid_user_size,
        iid_seed=iid_seed,
    )
