"""The GPU machine's wheel bundle (scripts/gpu_bundle.py), built for this machine's Python,
installed the way scripts/gpu_check.sh installs it and used for a real `debug=tiny` run.

The run's interpreter is a fresh virtual environment holding only the base the GPU machine
has (torch, torchvision, h5py and their dependencies, linked from this environment), so the
driver and every process Ray starts (its workers and agents use the same interpreter) can
import nothing but that base, the worktree and the installed bundle. What it does not
prove: the Python 3.12 wheels of the real bundle are downloaded and sized, not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_bundle  # noqa: E402

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _base_environment(into: Path) -> Path:
    """A venv without pip whose site-packages links the base closure's top-level entries
    (packages, modules and their .dist-info), like the GPU machine's own Python."""
    interpreter = Path(sys.base_prefix) / "bin" / f"python{PYTHON}"
    subprocess.run([str(interpreter), "-m", "venv", "--without-pip", str(into)], check=True)
    site = into / "lib" / f"python{PYTHON}" / "site-packages"
    for name in gpu_bundle.closure(gpu_bundle.BASE, PYTHON):
        dist = metadata.distribution(name)
        for file in dist.files or []:
            top = file.parts[0]
            source = Path(str(dist.locate_file(top)))
            if top not in ("..", "bin") and source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return into / "bin" / "python"


@pytest.mark.slow  # downloads ~60 wheels on a cold cache, installs them, runs Ray (~3-6 min)
def test_bundle_installs_offline_and_runs_debug_tiny(tmp_path: Path) -> None:
    # Prepare: the bundle for this Python, its offline install, the bare base interpreter
    bundle, site = tmp_path / "bundle", tmp_path / "site"
    manifest = gpu_bundle.build(bundle, REPO / ".gpu_bundle" / "cache" / f"py{PYTHON}", PYTHON)
    python = _base_environment(tmp_path / "base")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    install = subprocess.run(
        [*pip, "--target", str(site), *map(str, sorted(bundle.glob("*.whl")))],
        capture_output=True,
        text=True,
    )
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env = {**bare, "PYTHONPATH": f"{REPO}:{site}", "FLWR_TELEMETRY_ENABLED": "0"}
    env["PATH"] = f"{site / 'bin'}:{env['PATH']}"

    # Execute: the same run scripts/gpu_check.sh starts first (plots off: no matplotlib)
    dirs = [f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    without = subprocess.run([python, "-c", "import ray"], env=bare, capture_output=True)
    run = subprocess.run(
        [python, "-m", "flair_fl.run", "debug=tiny", "~logger.plots", *dirs],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )

    # Assert: nothing but the bundle provides Ray; the trimmed Ray ran the simulation
    assert install.returncode == 0, install.stderr[-3000:]
    assert without.returncode != 0, "the base environment must not see this venv's Ray"
    assert not any((site / "ray" / part).exists() for part in ("rllib", "serve", "tune", "jars"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["rounds"] == 2 and not results.get("diverged")
    assert float(manifest["total_mib"]) <= gpu_bundle.BUDGET_MIB  # type: ignore[arg-type]
