"""Every exception class of the package, grouped by where it is raised.

This module is imported by everything (config checks, data tools, the federated loop, the
job-failure reporter), so it imports nothing but the standard library: no torch, numpy,
Ray or Flower. The errors that are the user's to fix are reported in one line, without a
traceback (services/job_failure.py: `USER_ERRORS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from flair_fl.services.stopping import StopSignal

# --- config and run directory -------------------------------------------------------------


class ConfigError(ValueError):
    """A config value is out of range or of the wrong type."""


class RunDirBusy(ConfigError):
    """Another run holds the run directory's lock."""


# --- outputs --------------------------------------------------------------------------------


class OutputWriteError(OSError):
    """An output file could not be written; its previous content is kept."""


# --- a run's outcome ------------------------------------------------------------------------


class RunStopped(Exception):
    """The run stopped on a signal; `stop.exit_code` is the status to exit with."""

    def __init__(self, stop: StopSignal, detail: str):
        super().__init__(f"stopped by {stop.name}: {detail}")
        self.stop = stop


class TrainingDiverged(RuntimeError):
    """Every client update of a round was NaN/inf, or the global validation loss was."""


class NoRoundTrained(RuntimeError):
    """Every round of the run was skipped (too few usable client updates): the model is the
    untrained one."""


# --- data -----------------------------------------------------------------------------------


class FlairFormatError(ValueError):
    """The raw FLAIR data (or a file derived from it) is missing or malformed."""


class DownloadError(RuntimeError):
    """A file could not be downloaded or failed its checks."""


class DiskFullError(DownloadError):
    """A download could not be written: the disk (or quota, or file size limit) is full."""

    def __init__(self, path: Path, err: OSError):
        super().__init__(f"{path}: could not be written ({err.strerror or err})")
        self.path = path


class UnsafeArchiveError(DownloadError):
    """An archive member would escape its directory, replace a file, or exceed the caps."""


# --- clients (raised in the simulation's actor pool and in the ClientApp) -------------------


class ClientTimeout(RuntimeError):
    """A client ran past simulation.client_timeout; its actor was killed and replaced."""


class ClientActorDied(RuntimeError):
    """A client's actor process died (killed, out of memory); it was replaced."""


class ClientStopped(RuntimeError):
    """The run is stopping: the client's actor was killed, its reply is not waited for."""


class InjectedFault(RuntimeError):
    """Raised by the `raise` fault (federated/faults.py)."""


class FlowerPatchMismatch(RuntimeError):
    """The installed flwr is not the one federated/flower_patch.py was written for, or lacks
    a private name the patch replaces or reads."""
