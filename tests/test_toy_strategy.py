"""docs/ARCHITECTURE.md's worked example: a new server strategy is one Python file and one
config file, and nothing else of flair-fl changes.

Both files are copied out of the doc into a temporary directory (the module on PYTHONPATH,
the config through Hydra's search path), so the doc's code is what runs. The strategy,
x <- x + lr * (mean - x), is checked against what it must be: lr = 1 trains as FedAvg
(equal to rounding: x + (m - x) is m up to float32 rounding), and a configured lr = 0.5
reaches the server step (round 1 trains from the same model, round 2 from another).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import metrics_rows

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"


def _doc_block(language: str, after: str) -> str:
    """The first ```language block of the doc after the line naming `after`."""
    text = DOC.read_text()
    start = text.index(after)
    match = re.search(rf"```{language}\n(.*?)```", text[start:], re.S)
    assert match, f"no {language} block after {after!r} in {DOC}"
    return match.group(1)


def _example_files(tmp_path: Path) -> tuple[Path, Path]:
    code = tmp_path / "code"
    (code / "flair_fl_example").mkdir(parents=True)
    (code / "flair_fl_example" / "__init__.py").write_text("")
    module = _doc_block("python", "`flair_fl/algorithms/damped.py`")
    (code / "flair_fl_example" / "damped.py").write_text(module)
    config = _doc_block("yaml", "`conf/strategy/damped.yaml`")
    # the doc's module path, moved to where this test put the file
    config = config.replace("flair_fl.algorithms.damped.", "flair_fl_example.damped.")
    conf = tmp_path / "conf"
    (conf / "strategy").mkdir(parents=True)
    (conf / "strategy" / "damped.yaml").write_text(config)
    return code, conf


def _run(out: Path, overrides: list[str], code: Path) -> list[dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "flair_fl.run", *overrides, f"hydra.run.dir={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return metrics_rows(out)


@pytest.mark.slow
def test_the_documented_strategy_runs_from_one_file_and_one_config(
    tmp_path: Path, run_overrides: list[str]
) -> None:
    code, conf = _example_files(tmp_path)
    common = [*run_overrides, "eval_every=1", f"hydra.searchpath=[file://{conf}]"]

    fedavg = _run(tmp_path / "fedavg", [*common, "strategy=fedavg"], code)
    damped_1 = _run(tmp_path / "damped1", [*common, "strategy=damped"], code)
    half = _run(tmp_path / "damped05", [*common, "strategy=damped", "strategy.server.lr=0.5"], code)

    assert [r["round"] for r in damped_1] == [r["round"] for r in fedavg]
    for ours, reference in zip(damped_1, fedavg, strict=True):
        assert ours["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
        assert ours["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    # the config's lr reaches the server step: half a step is another model
    untrained = json.loads((tmp_path / "damped05" / "summary.json").read_text())
    assert half[0]["train_loss"] == pytest.approx(fedavg[0]["train_loss"], rel=1e-5)  # same start
    assert half[-1]["val_loss"] not in (fedavg[-1]["val_loss"], untrained["untrained_val_loss"])
