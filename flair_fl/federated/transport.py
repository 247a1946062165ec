"""How model-sized arrays travel between the driver and the virtual clients.

`message` (Flower's own path): the global weights ride in every train message as an
ArrayRecord and each update comes back as one; every hop serialises, copies and hashes
~45 MB for ResNet18 (docs/REFERENCE.md: ~190 ms per client on 2 cores).

`shared` (default, one node): the driver writes the round's global weights once into a
flat float32 file under a RAM-backed directory (/dev/shm); a message carries only its path
and layout. A client maps the file (no copy until its parameters are loaded from it) and
writes its update into a file of its own; the reply carries that path. The driver maps the
update and folds it straight into the round's running sum, then deletes it. Flower still
does the orchestration: sampling onto supernodes, scheduling on actors, replies, errors.

Both give the round loop the same thing per reply: a layout and one flat float32 vector.

The shared files live in `<root>/flair_fl-<pid>-<random>/`. A run removes its directory when
it ends, also when stopped by a signal (stopping.py); a run that was killed (SIGKILL, OOM)
cannot, so every new shared transport first removes the directories of dead pids of this
machine (a directory naming another host, on a shared `shared_dir`, is left alone).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from flair_fl.protocol import (
    LAYOUT_KEY,
    META_KEY,
    REPLY_DIR_KEY,
    REPLY_PATH_KEY,
    WEIGHTS_PATH_KEY,
    Layout,
    flatten_record,
)
from flair_fl.services import stopping
from flair_fl.services.processes import pid_alive, this_host

log = logging.getLogger(__name__)

TRANSPORTS = ("shared", "message")
DIR_PREFIX, HOST_FILE = "flair_fl-", "host"


def write_flat(path: Path, arrays: Mapping[str, torch.Tensor | np.ndarray]) -> Layout:
    """Write arrays end to end as float32 into `path` (via a temp name, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        for value in arrays.values():
            if isinstance(value, torch.Tensor):
                value = value.detach().to("cpu", torch.float32).contiguous().numpy()
            handle.write(np.ascontiguousarray(value, dtype=np.float32).data)
    os.replace(tmp, path)
    return Layout.of(arrays)


def map_flat(path: str | Path, layout: Layout | None = None) -> np.ndarray:
    """Map a flat float32 file without reading it (copy-on-write: writable, never written)."""
    flat = np.memmap(path, dtype=np.float32, mode="c")
    if layout is not None and flat.size != layout.size:
        raise ValueError(f"{path}: {flat.size} values, the layout needs {layout.size}")
    return flat


def default_shared_root() -> Path:
    """RAM-backed /dev/shm where it exists (Linux), else the temp directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class MessageTransport:
    """Flower's path: arrays inside the messages."""

    name = "message"

    def publish(self, tag: str, arrays: ArrayRecord) -> tuple[dict[str, Any], ArrayRecord | None]:
        """Config entries and the ArrayRecord to put into every message of `tag`."""
        return {}, arrays

    def reply_vector(self, reply: Message) -> tuple[Layout, np.ndarray]:
        return flatten_record(next(iter(reply.content.array_records.values())))

    def release(self, reply: Message) -> None:
        """Free what a reply holds (nothing here)."""

    def end_round(self) -> None:
        """Free the round's published weights (nothing here)."""

    def close(self) -> None:
        """Free everything (nothing here)."""

    def check_room(self, model_bytes: int) -> None:
        """Raise ConfigError if a round's files cannot fit (nothing to fit here)."""


class SharedTransport(MessageTransport):
    """Arrays in files on a RAM-backed file system; messages carry paths (one node only)."""

    name = "shared"

    def __init__(self, root: str | Path | None = None):
        base = Path(root) if root else default_shared_root()
        remove_dead_runs_files(base)
        self.dir = base / f"{DIR_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        (self.dir / HOST_FILE).write_text(this_host())
        self._remove_cleanup = stopping.add_cleanup(self.close)  # also on a forced exit
        self.round_dir: Path | None = None
        self.checked = False

    def publish(self, tag: str, arrays: ArrayRecord) -> tuple[dict[str, Any], ArrayRecord | None]:
        if not self.checked:
            _require_one_node()
            self.checked = True
        if self.round_dir is None:
            self.round_dir = self.dir / uuid.uuid4().hex[:8]
            self.round_dir.mkdir()
        path = self.round_dir / f"{tag}.f32"
        layout = write_flat(path, {k: v.numpy() for k, v in arrays.items()})
        entries = {
            WEIGHTS_PATH_KEY: str(path),
            LAYOUT_KEY: layout.to_json(),
            REPLY_DIR_KEY: str(self.round_dir),
        }
        return entries, None

    def reply_vector(self, reply: Message) -> tuple[Layout, np.ndarray]:
        meta = _meta(reply)
        layout = Layout.from_json(str(meta[LAYOUT_KEY]))
        return layout, map_flat(str(meta[REPLY_PATH_KEY]), layout)

    def release(self, reply: Message) -> None:
        path = _meta(reply).get(REPLY_PATH_KEY)
        if path:
            Path(str(path)).unlink(missing_ok=True)

    def end_round(self) -> None:
        """Delete the round's files; a late client's write then fails (its directory is gone)."""
        if self.round_dir is not None:
            shutil.rmtree(self.round_dir, ignore_errors=True)
            self.round_dir = None

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._remove_cleanup()

    def check_room(self, model_bytes: int) -> None:
        """Before Ray starts: reserve (and free) room for the global weights and one client
        update, so a shared dir too small for them fails now, in one line, naming the fix."""
        probe = self.dir / "room-check"
        try:
            with open(probe, "wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, 2 * model_bytes)
        except OSError as err:
            self.close()
            from flair_fl.errors import ConfigError

            raise ConfigError(
                f"simulation.shared_dir: {self.dir.parent} has no room for a round's shared "
                f"files (the global weights and one client update, {2 * model_bytes / 2**20:.0f} "
                f"MiB: {err.strerror}); free space there, point simulation.shared_dir at a "
                "larger directory (e.g. /tmp), or use simulation.transport=message"
            ) from None
        finally:
            probe.unlink(missing_ok=True)


def remove_dead_runs_files(root: Path) -> list[Path]:
    """Remove the shared-transport directories under `root` whose run (pid) is dead on this
    machine; returns them."""
    removed = []
    for path in root.glob(f"{DIR_PREFIX}*-*"):
        pid = path.name[len(DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or not path.is_dir() or pid_alive(int(pid)):
            continue
        try:
            host = (path / HOST_FILE).read_text().strip()
        except OSError:
            host = this_host()  # made before host files were written: /dev/shm is local
        if host != this_host():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.warning(
            "removed %d shared-memory dir(s) of killed runs under %s: %s",
            len(removed),
            root,
            ", ".join(p.name for p in removed),
        )
    return removed


def _require_one_node() -> None:
    import ray

    if ray.is_initialized() and sum(bool(node["Alive"]) for node in ray.nodes()) > 1:
        raise RuntimeError(
            "simulation.transport=shared needs the driver and all clients on one machine, but "
            "the Ray cluster has several nodes: use simulation.transport=message "
            "(simulation=cluster does)"
        )


def _meta(reply: Message) -> ConfigRecord:
    return reply.content.config_records[META_KEY]


def make_transport(name: str, root: str | None = None) -> MessageTransport:
    if name == "message":
        return MessageTransport()
    if name == "shared":
        return SharedTransport(root)
    raise ValueError(f"simulation.transport={name!r}: expected one of {', '.join(TRANSPORTS)}")
