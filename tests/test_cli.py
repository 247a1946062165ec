"""The data CLIs, run as users run them: `python scripts/<name>.py ...` from the repo root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.data.raw import METADATA_FILE, RELATIONSHIP_FILE

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_make_synthetic_then_prepare_then_read(tmp_path: Path) -> None:
    # Prepare
    raw, output = tmp_path / "raw", tmp_path / "out" / "flair.hdf5"

    # Execute
    made = run_script(
        "make_synthetic.py", "--out", raw,
        *["--num-users", "12", "--image-size", "16", "--seed", "2", "--fine-per-coarse", "2"],
    )  # fmt: skip
    prepared = run_script(
        "prepare_flair.py", "--dataset-dir", raw, "--output", output,
        *["--layout", "mlflair", "--no-progress"],
    )  # fmt: skip

    # Assert
    assert made.returncode == 0, made.stderr
    assert prepared.returncode == 0, prepared.stderr
    records = json.loads((raw / METADATA_FILE).read_text())
    assert f"wrote {len(records)} images of 12 users" in made.stdout
    assert str(output) in prepared.stdout
    assert "img/s" not in prepared.stderr  # --no-progress: no tqdm bar
    reader = FlairHDF5(output)
    assert reader.layout == "mlflair"
    assert sum(len(reader.population(s)) for s in reader.splits()) == 12
    assert sum(sum(reader.population(s).values()) for s in reader.splits()) == len(records)
    # --fine-per-coarse 2: each coarse name plus 2 children
    assert len((raw / RELATIONSHIP_FILE).read_text().splitlines()) == 17 * 3
    user, count = next(iter(reader.population("train").items()))
    assert reader.read_user("train", user).images.shape == (count, 16, 16, 3)


def test_prepare_reports_a_damaged_dataset_without_traceback(tmp_path: Path) -> None:
    # Prepare: a directory without labels_and_metadata.json
    (tmp_path / "raw").mkdir()

    # Execute
    result = run_script(
        "prepare_flair.py",
        "--dataset-dir",
        tmp_path / "raw",
        "--output",
        tmp_path / "flair.hdf5",
        "--no-progress",
    )

    # Assert
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "raw" / METADATA_FILE) in result.stderr
    assert "scripts/make_synthetic.py" in result.stderr
    assert not (tmp_path / "flair.hdf5").exists()
