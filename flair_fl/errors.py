"""Errors a run reports in one line (no traceback): they are the run's outcome, not a bug."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """Every client update of a round was NaN/inf, or the global validation loss was."""


class NoRoundTrained(RuntimeError):
    """Every round of the run was skipped (too few usable client updates): the model is the
    untrained one."""
