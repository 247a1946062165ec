"""What a Hydra job does when its run fails, so that one failed job never poisons a sweep.

The error goes to `<job dir>/error.txt` (with its traceback), open loggers are closed (the
W&B run is finished, marked failed) and Ray is shut down if it is still up. Then:

- single run: configuration and dataset errors exit with status 2 and a one-line message;
  other errors propagate (traceback, status 1).
- multirun with `sweep_continue_on_error=true` (the default): the job scores
  `FAILED_JOB_SCORE` (-inf, the worst value of the maximised best val macro AP, so an
  Optuna search records the trial and steers away) and the sweep goes on.
- multirun with `sweep_continue_on_error=false`: the sweep stops at this job (status 1, or 2
  for configuration errors), for both Hydra's basic sweeper and the Optuna sweeper.
- a run stopped by a signal (stopping.py) is no failure: it says so in one line, runs the
  signal's action and exits with the signal's status (130 for SIGINT, 143 for SIGTERM), in a
  multirun too (the sweep stops).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from flair_fl.errors import (
    ConfigError,
    FlairFormatError,
    FlowerPatchMismatch,
    NoRoundTrained,
    OutputWriteError,
    RunStopped,
    TrainingDiverged,
)

FAILED_JOB_SCORE = float("-inf")
ERROR_FILE = "error.txt"
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    OutputWriteError,
    TrainingDiverged,
    NoRoundTrained,
    FlairFormatError,
    FlowerPatchMismatch,  # the fix is installing the flwr pyproject.toml names
)  # reported in one line, no traceback


def user_error(err: BaseException) -> bool:
    """Whether `err` is the user's to fix (one line, no traceback)."""
    return isinstance(err, USER_ERRORS)


def in_multirun() -> bool:
    """Whether this process runs the jobs of a Hydra multirun (grid or Optuna)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def release_job_resources() -> None:
    """Close loggers left open by a failed run and shut Ray down if it is still up."""
    loggers = sys.modules.get("flair_fl.loggers")  # none open if they were never imported
    if loggers is not None:
        loggers.close_open_loggers()
    ray = sys.modules.get("ray")  # never import Ray just to find it was not started
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def record_error(err: BaseException, job_dir: Path) -> Path:
    """Write the error and its traceback to `<job dir>/error.txt`; returns the path."""
    path = job_dir / ERROR_FILE
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(err)))
    except OSError as write_err:  # a full disk must not hide the error being reported
        print(f"flair-fl: could not write {path} ({write_err})", file=sys.stderr, flush=True)
    return path


def job_failed(err: Exception, job_dir: Path, continue_sweep: bool) -> float:
    """Record and clean up after a failed job; return its sweep score or stop (see above)."""
    if isinstance(err, RunStopped):
        release_job_resources()
        print(f"flair-fl: {err}", file=sys.stderr, flush=True)
        if err.stop.action is not None:
            err.stop.action()
        raise SystemExit(err.stop.exit_code) from None
    path = record_error(err, job_dir)
    release_job_resources()
    message = str(err) if user_error(err) else f"{type(err).__name__}: {err}"
    if not in_multirun():
        if user_error(err):
            print(f"flair-fl: error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise err
    if continue_sweep:
        print(
            f"flair-fl: job failed: {message}\n  traceback in {path}; the sweep goes on "
            f"(sweep_continue_on_error=true), this job scores {FAILED_JOB_SCORE}",
            file=sys.stderr,
            flush=True,
        )
        return FAILED_JOB_SCORE
    print(
        f"flair-fl: job failed, stopping the sweep (sweep_continue_on_error=false): {message}\n"
        f"  traceback in {path}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(2 if user_error(err) else 1) from None
