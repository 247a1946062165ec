"""Everything an HDF5 file holds, as comparable Python values (for `==` between files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def _value(dataset: h5py.Dataset) -> Any:
    data = dataset[()]
    if h5py.check_string_dtype(dataset.dtype) is None and h5py.check_vlen_dtype(dataset.dtype):
        return [bytes(item) for item in data]  # the compact store's JPEG bytes
    if isinstance(data, bytes) and data[:1] in (b"{", b"["):
        return json.loads(data)  # metadata JSON: key order may differ between writers
    array = np.asarray(data)
    return (array.dtype.str, array.shape, array.tobytes())


def hdf5_contents(path: Path) -> dict[str, Any]:
    """{object name: value} for every dataset and {name@attr: value} for every attribute."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as h5:

        def visit(name: str, obj: h5py.Group | h5py.Dataset) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = _value(obj)
            for key, value in obj.attrs.items():
                out[f"{name}@{key}"] = np.asarray(value).tolist()

        h5.visititems(visit)
        out.update({f"@{k}": np.asarray(v).tolist() for k, v in h5.attrs.items()})
    return out
