"""Loggers: the driver owns all logging; actors only return metrics."""

from __future__ import annotations

from typing import Any, Protocol


class RunLogger(Protocol):
    """What every logger (csv/jsonl, wandb, ...) implements."""

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None: ...

    def log_summary(self, summary: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
