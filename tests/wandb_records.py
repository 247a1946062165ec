"""Read an offline W&B run back from its `.wandb` transaction log (test helper).

wandb 0.31 ships no Python reader for its run files (the writer is the Go `wandb-core`), so
this parses the framing, which is LevelDB's log format behind a 7-byte file header (`:W&B`,
magic 0xBEE1, version), and decodes each record with wandb's own protobuf `Record`. Every
chunk's CRC-32 is checked, so a damaged or misread file fails the test instead of passing.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK_SIZE = 32 * 1024
HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32(type + data), length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """Every protobuf `Record` of a `.wandb` file, in order."""
    data = path.read_bytes()
    ident, magic, _ = HEADER.unpack_from(data)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER.size
    while pos + CHUNK.size <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK.size:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK.size : pos + CHUNK.size + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad chunk checksum at {pos}"
        pos += CHUNK.size + length
        pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else str(item.key)


@dataclass
class OfflineRun:
    """What an offline W&B run holds: run settings, config, history, summary, exit code."""

    run_id: str = ""
    group: str = ""
    name: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def read_offline_run(run_dir: Path, timeout: float = 60.0) -> OfflineRun:
    """Decode the single `.wandb` file of an offline run directory.

    wandb-core writes the file from its own process and can still be flushing when
    `run.finish()` returns (seen on a loaded 2-core machine), so wait for the exit record.
    """
    (path,) = run_dir.glob("*.wandb")
    deadline = time.monotonic() + timeout
    records = _complete_records(path)
    while records is None and time.monotonic() < deadline:
        time.sleep(0.2)
        records = _complete_records(path)
    run = OfflineRun()
    for record in records if records is not None else read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group = record.run.run_id, record.run.run_group
            run.name, run.project = record.run.display_name, record.run.project
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def _complete_records(path: Path) -> list[Any] | None:
    """The file's records once its exit record is written, else None."""
    try:
        records = read_records(path)
    except AssertionError:  # a chunk still being written
        return None
    done = any(r.WhichOneof("record_type") == "exit" for r in records)
    return records if done else None


def offline_runs(out_dir: Path) -> list[Path]:
    """The offline run directories under a run dir's `wandb/`."""
    return sorted((out_dir / "wandb").glob("offline-run-*"))
