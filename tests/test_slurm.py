"""SLURM sweeps and pre-emption: submitit launchers, SIGUSR signals, requeue as a resume.

End-to-end tests run real processes: a multirun through `hydra/launcher=submitit_local`
(submitit's local executor, the SLURM executor's stand-in: same pickled submission, same
signal handling and checkpoint hook, requeue by restarting the task), and a run stopped by
SIGUSR1 / SIGUSR2 as SLURM's `--signal` warns a job before its time limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra._internal.callbacks import Callbacks
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import HydraContext, RunMode

from flair_fl.artifacts.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flair_fl.services.job_resources import job_cpus, sized_init_args
from hydra_plugins.flair_fl_launcher.resuming_launcher import ResumingLocalLauncher, with_resume
from tests.conftest import CACHE_DIR
from tests.helpers import CONF_DIR, metrics_rows
from tests.wandb_records import offline_runs, read_offline_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["debug=tiny", f"data.cache_dir={CACHE_DIR}"]


def test_a_run_starting_its_own_ray_gets_the_jobs_cpus_not_the_nodes() -> None:
    node = os.cpu_count() or 1
    if node < 2 or job_cpus({}) < 2:
        pytest.skip("needs a process allowed on 2+ cores")

    in_job = sized_init_args({"logging_level": "ERROR"}, {"SLURM_CPUS_PER_TASK": "1"})
    attached = sized_init_args({"address": "10.0.0.1:6379"}, {"SLURM_CPUS_PER_TASK": "1"})
    explicit = sized_init_args({"num_cpus": 2}, {"SLURM_CPUS_PER_TASK": "1"})
    outside = sized_init_args({}, {})

    assert in_job == {"logging_level": "ERROR", "num_cpus": 1}
    assert "num_cpus" not in attached  # an attached cluster has its own resources
    assert explicit["num_cpus"] == 2  # what the user set wins
    assert outside.get("num_cpus", node) == job_cpus({})  # the affinity where it is smaller


def test_a_job_resumes_its_run_dir_only_when_it_holds_a_checkpoint(tmp_path: Path) -> None:
    # Prepare: a job dir named as Hydra names them (`=` and `,` in it)
    job = tmp_path / "0_client.lr=0.05,strategy=fedprox"
    job.mkdir()
    overrides = ["client.lr=0.05", "strategy=fedprox"]

    fresh = with_resume(overrides, job)
    (job / CHECKPOINT_NAME).write_bytes(b"")
    resumed = with_resume(overrides, job)
    given = with_resume([*overrides, "resume=/elsewhere"], job)

    assert fresh == overrides
    assert resumed[:2] == overrides and len(resumed) == 3
    (parsed,) = OverridesParser.create().parse_overrides([resumed[2]])
    assert parsed.key_or_group == "resume" and parsed.value() == str(job.resolve())
    assert given == [*overrides, "resume=/elsewhere"]


@pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema")  # as run.py
def test_the_submission_submitit_requeues_is_the_same_job_resuming_its_run_dir(
    tmp_path: Path,
) -> None:
    # Prepare: the launcher as Hydra sets it up for a multirun, and job 0's dir with a
    # checkpoint in it (what a stopped run leaves)
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    config = loader.load_configuration(
        "config",
        ["hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}"],
        run_mode=RunMode.MULTIRUN,
    )
    launcher = ResumingLocalLauncher()
    launcher.setup(
        hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks()),
        task_function=lambda cfg: None,
        config=config,
    )
    job = launcher.job_dir(["client.lr=0.05"], 0)
    job.mkdir()
    (job / CHECKPOINT_NAME).write_bytes(b"")
    args = (["client.lr=0.05"], "hydra.sweep.dir", 0, "job_id_for_0", {})

    # Execute: what submitit calls on SIGUSR2 (its checkpoint hook)
    submission = launcher.checkpoint(*args)

    # Assert: this launcher, the same job arguments plus resume=<that dir>, the same dir
    assert job == tmp_path / "0_client.lr=0.05"
    assert submission.function is launcher
    overrides, *rest = submission.args
    assert rest == list(args[1:])
    (resume,) = OverridesParser.create().parse_overrides(overrides[1:])
    assert overrides[0] == "client.lr=0.05" and resume.value() == str(job.resolve())
    assert launcher.job_dir(overrides, 0) == job  # resume is not part of the dir name


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted(
        (p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")),
        key=lambda p: int(p.name.split("_")[0]),
    )


def _rounds(job: Path) -> list[int]:
    return [row["round"] for row in metrics_rows(job)]


def _multirun(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flair_fl.run", "-m", "hydra/launcher=submitit_local", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow  # two real runs through submitit, each with its own Ray (~1-2 min)
def test_submitit_local_sweep_runs_every_job_as_a_local_run_does(tmp_path: Path) -> None:
    # Prepare
    sweep_dir = tmp_path / "sweep"

    # Execute: 2 jobs, as separate processes, at once
    sweep = _multirun([*TINY, "client.lr=0.05,0.1", f"hydra.sweep.dir={sweep_dir}"])
    output = sweep.communicate(timeout=900)[0]

    # Assert: each job dir holds what a local run writes, under Hydra's usual names
    assert sweep.returncode == 0, output[-3000:]
    jobs = _jobs(sweep_dir)
    assert [job.name for job in jobs] == [
        "0_client.lr=0.05,debug=tiny",
        "1_client.lr=0.1,debug=tiny",
    ]
    for job in jobs:
        for name in ("metrics.csv", "summary.json", "results.json", "model_final.pt"):
            assert (job / name).is_file(), f"{job.name}: {name}"
        assert _rounds(job) == [1, 2]
        assert json.loads((job / "summary.json").read_text())["rounds"] == 2
        assert not (job / "error.txt").exists()
    assert list((sweep_dir / ".submitit").iterdir())  # submitit's own files stay apart
    table = subprocess.run(
        [sys.executable, "scripts/summarize.py", str(sweep_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert table.returncode == 0, table.stderr
    rows = {
        line.split()[0]: line.split()[1:3]  # client.lr: (finished jobs, failed jobs)
        for line in table.stdout.splitlines()
        if line.startswith(("0.05 ", "0.1 "))
    }
    assert rows == {"0.05": ["1", "0"], "0.1": ["1", "0"]}, table.stdout


def _wait_for(path: Path, rounds: int, process: subprocess.Popen[str]) -> None:
    """Wait until the metrics file `path` (a glob pattern in its last two parts) has
    `rounds` rows."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found = list(path.parent.parent.glob(f"{path.parent.name}/{path.name}"))
        if found and len(found[0].read_text().splitlines()) >= rounds:
            return
        if process.poll() is not None:
            raise AssertionError(process.communicate()[0][-3000:])
        time.sleep(0.2)
    raise AssertionError(f"{path}: not {rounds} rounds in time")


def _wandb_steps(run_dir: Path) -> tuple[set[str], list[int]]:
    """The run ids of the run dir's offline W&B runs and every step they logged, in order."""
    ids, steps = set(), []
    for offline in offline_runs(run_dir):
        run = read_offline_run(offline)
        ids.add(run.run_id)
        steps += sorted({int(row["_step"]) for row in run.history})
    return ids, steps


@pytest.mark.slow  # a real run stopped, then resumed (~1-2 min)
def test_sigusr1_stops_with_a_checkpoint_and_resume_finishes_the_same_wandb_run(
    tmp_path: Path,
) -> None:
    # Prepare: a run with W&B (offline), checkpointing every round, two rounds in
    run_dir = tmp_path / "run"
    wandb = ["logger=wandb", "logger.wandb.mode=offline", "checkpoint_every=1"]
    args = [sys.executable, "-m", "flair_fl.run", *TINY, *wandb, "num_rounds=6"]
    run = subprocess.Popen(
        [*args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _wait_for(run_dir / "metrics.jsonl", 2, run)

    # Execute: SLURM's warning before the time limit, to every process of the job step (the
    # driver and its Ray processes, as slurmstepd signals them); then resume the run
    os.killpg(run.pid, signal.SIGUSR1)
    stopped = run.communicate(timeout=120)[0]
    checkpoint = load_checkpoint(run_dir)
    stopped_rounds = _rounds(run_dir)
    resumed = subprocess.run(
        [*args, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'resume'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    # Assert: status 138, a checkpoint of the last logged round; the resume finished the
    # run, and W&B holds one run with every round once
    assert run.returncode == 138, stopped[-3000:]
    assert "stopped by SIGUSR1" in stopped and "Traceback" not in stopped
    assert 2 <= checkpoint["round"] == stopped_rounds[-1] < 6
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _rounds(run_dir) == [1, 2, 3, 4, 5, 6]
    ids, steps = _wandb_steps(run_dir)
    assert len(ids) == 1
    assert steps == [0, 1, 2, 3, 4, 5, 6]


def _submitit_tasks(sweep_dir: Path) -> list[int]:
    """Pids of the submitit task processes (`python -m submitit.core._submit`) of a sweep."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "submitit.core._submit" in cmdline and str(sweep_dir) in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow  # a real job stopped, requeued by submitit and resumed (~1-2 min)
def test_sigusr2_requeues_a_submitit_job_which_resumes_its_run_dir(tmp_path: Path) -> None:
    # Prepare: one job through submitit (local executor), two rounds in
    sweep_dir = tmp_path / "sweep"
    wandb = ["logger=wandb", "logger.wandb.mode=offline", "checkpoint_every=1"]
    sweep = _multirun([*TINY, *wandb, "num_rounds=6", "seed=3", f"hydra.sweep.dir={sweep_dir}"])
    _wait_for(sweep_dir / "0_*" / "metrics.jsonl", 2, sweep)
    (job,) = sweep_dir.glob("0_*")
    (task,) = _submitit_tasks(sweep_dir)

    # Execute: the signal submitit_slurm has SLURM send before the time limit
    os.kill(task, signal.SIGUSR2)
    output = sweep.communicate(timeout=900)[0]

    # Assert: the job was requeued, resumed its own run dir and finished it; one W&B run
    assert sweep.returncode == 0, output[-3000:]
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*.out"))
    logs += "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*.err"))
    assert "stopped by SIGUSR2" in logs and "Requeued job" in logs, logs[-3000:]
    assert _jobs(sweep_dir) == [job]  # the resume ran in the same dir, under the same name
    assert _rounds(job) == [1, 2, 3, 4, 5, 6]
    assert json.loads((job / "results.json").read_text())["rounds"] == 6
    assert "resume=" in (job / ".hydra" / "overrides.yaml").read_text()  # the requeued job's
    ids, steps = _wandb_steps(job)
    assert len(ids) == 1
    assert steps == [0, 1, 2, 3, 4, 5, 6]
