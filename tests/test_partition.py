"""IID pseudo-users (data.partition=iid), as pfl-research's flair_iid."""

from __future__ import annotations

import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.partition import IidPartition
from flair_fl.data.source import open_reader
from flair_fl.errors import FlairFormatError
from flair_fl.modes.federated import run_experiment
from tests.helpers import compose_config, metrics_rows


@pytest.fixture(scope="module")
def base(tiny_hdf5: Path) -> FlairHDF5:
    return FlairHDF5(tiny_hdf5)


def all_train_images(base: FlairHDF5) -> Counter[tuple[str, int]]:
    return Counter((u, i) for u, n in base.population("train").items() for i in range(n))


@pytest.mark.parametrize("size", [1, 7, 10])
def test_pseudo_users_have_the_size_and_use_every_train_image_once(
    size: int, base: FlairHDF5
) -> None:
    # Prepare
    total = sum(base.population("train").values())
    iid = IidPartition(base, size, seed=0)

    # Execute
    population = iid.population("train")
    members = Counter(m for user in population for m in iid.members(user))

    # Assert: ceil(N / size) users of `size` images, the last one the remainder
    assert len(population) == math.ceil(total / size)
    sizes = list(population.values())
    assert sizes[:-1] == [size] * (len(sizes) - 1)
    assert sizes[-1] == total - size * (len(sizes) - 1)
    assert members == all_train_images(base)  # each exactly once


def test_partition_is_seeded(base: FlairHDF5) -> None:
    # Execute
    def assignment(seed: int) -> list[list[tuple[str, int]]]:
        iid = IidPartition(base, 10, seed)
        return [iid.members(user) for user in iid.population("train")]

    # Assert
    assert assignment(3) == assignment(3)
    assert assignment(3) != assignment(4)


def test_pseudo_user_reads_its_members_images_and_targets(base: FlairHDF5) -> None:
    # Prepare
    iid = IidPartition(base, 10, seed=1)
    user = list(iid.population("train"))[2]
    members = iid.members(user)
    assert len({owner for owner, _ in members}) > 1  # the test needs a mixed pseudo-user

    # Execute
    data = iid.read_user("train", user, "fine")
    capped = iid.read_user("train", user, "fine", max_images=4)

    # Assert: in the pseudo-user's (shuffled) order
    for row, (owner, index) in enumerate(members):
        natural = base.read_user("train", owner, "fine")
        np.testing.assert_array_equal(data.images[row], natural.images[index])
        np.testing.assert_array_equal(data.targets[row], natural.targets[index])
    np.testing.assert_array_equal(capped.images, data.images[:4])
    np.testing.assert_array_equal(capped.targets, data.targets[:4])


def test_val_and_test_keep_their_natural_users(base: FlairHDF5) -> None:
    # Prepare
    iid = IidPartition(base, 10, seed=0)
    user = next(iter(base.population("val")))

    # Execute, Assert
    assert iid.population("val") == base.population("val")
    assert iid.population("test") == base.population("test")
    np.testing.assert_array_equal(
        iid.read_user("val", user).images, base.read_user("val", user).images
    )
    assert iid.splits() == base.splits() and iid.label_mapping() == base.label_mapping()


def test_unknown_pseudo_user_is_named(base: FlairHDF5) -> None:
    iid = IidPartition(base, 10, seed=0)
    natural = next(iter(base.population("train")))

    with pytest.raises(FlairFormatError, match=r"is not one of the \d+ IID pseudo-users"):
        iid.read_user("train", natural)
    with pytest.raises(FlairFormatError, match="IID pseudo-users"):
        iid.read_user("train", "iid-999999")


def test_reader_rebuilt_from_plain_settings_is_the_same(tiny_hdf5: Path) -> None:
    # Prepare: what the driver builds, and what a client builds from ClientSpec's values
    cfg = compose_config(["data=flair", f"data.path={tiny_hdf5}", "data.partition=iid", "seed=5"])
    data = instantiate(cfg.data)

    # Execute
    client = open_reader(str(tiny_hdf5), **data.reader_settings())
    pickled = pickle.loads(pickle.dumps(data.reader))

    # Assert: the Hydra default seeds the partition from the run seed
    assert data.reader_settings() == {"partition": "iid", "iid_user_size": 10, "iid_seed": 5}
    for reader in (client, pickled):
        assert isinstance(reader, IidPartition)
        assert reader.population("train") == data.reader.population("train")
        assert [reader.members(u) for u in list(reader.population("train"))[:5]] == [
            data.reader.members(u) for u in list(data.reader.population("train"))[:5]
        ]
    with pytest.raises(ValueError, match=r"data\.partition must be one of"):
        open_reader(str(tiny_hdf5), partition="dirichlet")


@pytest.mark.slow  # a real run through Ray (~15-120 s on 2 cores); CI runs it
def test_run_with_iid_partition(run_overrides: list[str], tmp_path: Path) -> None:
    # Prepare
    cfg = compose_config(
        [*run_overrides, "data.partition=iid", "data.iid_user_size=5", "eval.test_at_end=false"]
    )
    data = instantiate(cfg.data)
    images = sum(data.reader.base.population("train").values())

    # Execute
    summary = run_experiment(cfg, tmp_path)

    # Assert: clients rebuilt the IID reader (a natural reader fails on `iid-...` users)
    rows = metrics_rows(tmp_path)
    assert summary["rounds"] == cfg.num_rounds
    assert all(r["clients_ok"] == cfg.cohort_size and r["clients_failed"] == 0 for r in rows)
    assert len(data.reader.population("train")) == math.ceil(images / 5)
