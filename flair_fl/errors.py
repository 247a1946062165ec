"""Errors a run reports in one line (no traceback): they are the run's outcome, not a bug."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """Every client update of a round was NaN/inf, or the global validation loss was."""
