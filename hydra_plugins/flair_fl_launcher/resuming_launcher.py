"""Hydra's submitit launchers, with requeued jobs resuming their own run dir.

`hydra/launcher=submitit_slurm` (conf/hydra/launcher/) submits each job of a multirun as a
SLURM job (`submitit_local`: as a local process, for testing); each job runs `flair_fl.run`
with its overrides, exactly as it runs locally, into the same job dir.

Requeue (submitit's checkpointing): SLURM warns a job with `--signal` (submitit: SIGUSR2,
`signal_delay_s` before the time limit, or on pre-emption where the cluster sends it). The run
stops cleanly on it (stopping.py: the round abandoned, the last round checkpointed, W&B
flushed), then hands the signal on to submitit, which calls the launcher's `checkpoint()`,
saves the submission it returns and requeues the job (`scontrol requeue`; `max_num_timeout`
bounds how often a timed-out job is requeued). `checkpoint()` returns the same job with
`resume=<its run dir>`, so the requeued job continues that run dir from its checkpoint, and
its W&B run (the id is kept in the run dir). A job that SLURM itself restarts (pre-emption
in REQUEUE mode, a node failure with `--requeue`) runs its first submission again: that
resumes too, since a job whose dir already holds a checkpoint is started with `resume=`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    BaseSubmititLauncher,
    LocalLauncher,
    SlurmLauncher,
)
from omegaconf import open_dict

RESUME_KEY = "resume"
# Hydra imports every hydra_plugins module at start-up (--help too): flair_fl, which brings
# torch, is imported only when a job runs.


def quoted(path: str) -> str:
    """`path` as a quoted Hydra override value (job dirs hold `=` and `,`)."""
    from flair_fl.errors import ConfigError

    for quote in ("'", '"'):
        if quote not in path:
            return f"{quote}{path}{quote}"
    raise ConfigError(f"{path}: a run dir name with both kinds of quotes cannot be resumed")


def with_resume(overrides: list[str], run_dir: Path) -> list[str]:
    """`overrides` plus `resume=<run_dir>` if the run dir holds a checkpoint and no resume
    is set; otherwise unchanged (nothing to resume: the job starts from scratch)."""
    from flair_fl.artifacts.checkpoint import CHECKPOINT_NAME

    if any(o.split("=", 1)[0].lstrip("+~") == RESUME_KEY for o in overrides):
        return list(overrides)
    if not (run_dir / CHECKPOINT_NAME).is_file():
        return list(overrides)
    return [*overrides, f"{RESUME_KEY}={quoted(str(run_dir.resolve()))}"]


class _Resuming(BaseSubmititLauncher):
    """A submitit launcher whose jobs resume their run dir when requeued (module doc)."""

    def job_dir(self, sweep_overrides: list[str], job_num: int) -> Path:
        """The dir Hydra gives this job (`hydra.sweep.dir`/`hydra.sweep.subdir`)."""
        assert self.hydra_context is not None and self.config is not None
        sweep = self.hydra_context.config_loader.load_sweep_config(self.config, sweep_overrides)
        with open_dict(sweep.hydra.job):
            sweep.hydra.job.num = job_num
        return Path(str(sweep.hydra.sweep.dir)) / str(sweep.hydra.sweep.subdir)

    def __call__(
        self, sweep_overrides: list[str], job_dir_key: str, job_num: int, *rest: Any
    ) -> Any:
        overrides = with_resume(sweep_overrides, self.job_dir(sweep_overrides, job_num))
        return super().__call__(overrides, job_dir_key, job_num, *rest)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The submission to requeue: this job again, resuming its run dir."""
        import submitit

        sweep_overrides, job_dir_key, job_num, *rest = args
        overrides = with_resume(list(sweep_overrides), self.job_dir(sweep_overrides, job_num))
        return submitit.helpers.DelayedSubmission(
            self, overrides, job_dir_key, job_num, *rest, **kwargs
        )


class ResumingSlurmLauncher(_Resuming, SlurmLauncher):
    """`hydra/launcher=submitit_slurm`."""


class ResumingLocalLauncher(_Resuming, LocalLauncher):
    """`hydra/launcher=submitit_local`: jobs as local processes (tests, a workstation)."""
