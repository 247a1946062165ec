"""Per-user client state kept on disk (SCAFFOLD's control variates), keyed by user id.

Model-sized per-user state must not live in Flower's per-node context (which is shipped with
every message) nor in the driver; the clients read and write it here. Files are replaced
atomically, so a killed client never leaves a half-written state. They live in the run
directory, so they are loaded as data only (`weights_only=True`), and each user's file name is
an escaped form of the user id: distinct ids never share a file, none leaves the directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import quote

import torch

from flair_fl.artifacts.safe_load import load_state_dict_file

State = dict[str, torch.Tensor]
MAX_NAME = 200  # bytes of an escaped id kept as the file name (file systems allow 255)


def state_file_name(user_id: str) -> str:
    """`<escaped id>.pt`: percent-escaped (injective, never a `/`; with the suffix never `.` or
    `..`); an id too long for a file name is replaced by its SHA-256."""
    escaped = quote(user_id, safe="@._-")
    if not escaped or len(escaped) > MAX_NAME:
        escaped = "sha256-" + hashlib.sha256(user_id.encode()).hexdigest()
    return escaped + ".pt"


class UserStateStore:
    """One `.pt` file per user under `root/<kind>/`."""

    def __init__(self, root: str | Path, kind: str):
        self.dir = Path(root) / kind
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, user_id: str) -> Path:
        return self.dir / state_file_name(user_id)

    def load(self, user_id: str) -> State | None:
        path = self._path(user_id)
        if not path.is_file():
            return None
        return load_state_dict_file(path, f"client state of user {user_id!r}")

    def save(self, user_id: str, state: State) -> None:
        path = self._path(user_id)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
